//! Two `ringsocket serve --redis-cluster` processes on a throwaway 3-master Redis
//! Cluster, with topics spread over the three shards: every message crosses exactly
//! once and in order; a `ringsocket.v1` client recovers on the other process with the
//! offsets the cluster keeps; a master that restarts (empty) holds nothing back for
//! good: local delivery goes on meanwhile and the backlog reaches the other process
//! once it is back; a slot moved to another master mid-stream is followed (MOVED,
//! resubscription on the new shard) with nothing lost and offsets going on.
#![allow(clippy::unwrap_used)]

mod common;

use common::redis_cluster::{MASTERS, RedisCluster};
use common::serve::{Serve, assert_quiet, eventually, expect_sequence};
use common::v1::{publications, publish_http, request, subscribe, v1};
use common::{Client, ws_connect};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn serve(cluster: &RedisCluster) -> Serve {
    Serve::with_args(&["--redis", &cluster.url(), "--redis-cluster"])
}

/// `per` topics on each master: (topic, node serving it).
fn spread(cluster: &RedisCluster, per: usize) -> Vec<(String, usize)> {
    let mut counts = [0; MASTERS];
    let mut out = Vec::new();
    for i in 0.. {
        let topic = format!("t{i}");
        let node = cluster.owner(cluster.slot(&format!("ringsocket:{{{topic}}}")));
        if counts[node] < per {
            counts[node] += 1;
            out.push((topic, node));
        }
        if counts.iter().all(|&c| c == per) {
            break;
        }
    }
    out
}

async fn send_all(sender: &mut Client, prefix: &str, n: usize) {
    for i in 0..n {
        sender
            .send(WsMessage::text(format!("{prefix} {i}")))
            .await
            .unwrap();
    }
}

async fn subscribed(serve: &Serve, topics: u64) {
    eventually("subscribed on every shard", async || {
        serve.metric("ringsocket_broker_subscriptions").await == Some(topics)
            && serve.metric("ringsocket_broker_shards").await == Some(MASTERS as u64)
            && serve.metric("ringsocket_broker_connected").await == Some(1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_spread_over_shards_cross_once_in_order_and_recover_elsewhere() {
    let cluster = RedisCluster::start();
    let a = serve(&cluster);
    let b = serve(&cluster);
    let topics: Vec<String> = spread(&cluster, 2).into_iter().map(|(t, _)| t).collect();
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for (i, topic) in topics.iter().enumerate() {
        receivers.push((
            ws_connect(a.addr, &format!("/ws/{topic}")).await,
            ws_connect(b.addr, &format!("/ws/{topic}")).await,
        ));
        let from = if i % 2 == 0 { &a } else { &b };
        senders.push(ws_connect(from.addr, &format!("/ws/{topic}")).await);
    }
    for serve in [&a, &b] {
        subscribed(serve, topics.len() as u64).await;
    }
    const N: usize = 30;
    for i in 0..N {
        for (topic, sender) in topics.iter().zip(&mut senders) {
            sender
                .send(WsMessage::text(format!("{topic} {i}")))
                .await
                .unwrap();
        }
    }
    for (topic, (on_a, on_b)) in topics.iter().zip(&mut receivers) {
        expect_sequence(std::slice::from_mut(on_a), topic, N).await;
        expect_sequence(std::slice::from_mut(on_b), topic, N).await;
    }
    for serve in [&a, &b] {
        assert_eq!(
            serve.metric("ringsocket_broker_publish_failed_total").await,
            Some(0)
        );
        assert!(
            serve
                .metric("ringsocket_broker_topology_refreshes_total")
                .await
                >= Some(1)
        );
    }
    for (i, (on_a, on_b)) in receivers.iter_mut().enumerate() {
        assert_quiet(on_a, &format!("receiver {i} on A")).await;
        assert_quiet(on_b, &format!("receiver {i} on B")).await;
    }

    // ringsocket.v1: one epoch and the same offsets on both processes, and a client
    // that comes back on the other process recovers what it missed.
    let topic = &topics[1];
    let mut on_a = v1(a.addr, "").await;
    let reply = subscribe(&mut on_a, 1, topic, None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    let mut on_b = v1(b.addr, "").await;
    let reply = subscribe(&mut on_b, 1, topic, None).await;
    assert_eq!(reply["epoch"], epoch.as_str(), "one epoch for every node");
    let top = reply["offset"].as_u64().unwrap_or(0);
    let mut publisher = v1(b.addr, "").await;
    for i in 1..=5u64 {
        let ack = request(
            &mut publisher,
            json!({"id": i, "type": "publish", "topic": topic, "data": i}),
        )
        .await;
        assert_eq!(ack["type"], "published", "{ack}");
        assert_eq!(ack["offset"].as_u64(), Some(top + i), "{ack}");
    }
    let expected: Vec<(u64, String, Value)> = (1..=5)
        .map(|i| (top + i, epoch.clone(), json!(i)))
        .collect();
    assert_eq!(publications(&mut on_a, 5).await, expected, "on A");
    assert_eq!(publications(&mut on_b, 5).await, expected, "on B");
    drop(on_a);
    for i in 6..=10 {
        publish_http(a.addr, topic, &i.to_string()).await;
    }
    assert_eq!(
        publications(&mut on_b, 5).await.last().map(|p| p.0),
        Some(top + 10)
    );
    let mut back = v1(b.addr, "").await;
    let reply = subscribe(&mut back, 2, topic, Some((top + 5, &epoch))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(true), Some(5)),
        "{reply}"
    );
    assert_eq!(
        publications(&mut back, 5).await,
        (6..=10)
            .map(|i| (top + i, epoch.clone(), json!(i)))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restart_holds_messages_back_and_loses_none() {
    let mut cluster = RedisCluster::start();
    let a = serve(&cluster);
    let b = serve(&cluster);
    let spread = spread(&cluster, 1);
    let (down_topic, down) = spread[0].clone();
    let (up_topic, _) = spread[1].clone();
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    let mut senders = Vec::new();
    for topic in [&down_topic, &up_topic] {
        on_a.push(ws_connect(a.addr, &format!("/ws/{topic}")).await);
        on_b.push(ws_connect(b.addr, &format!("/ws/{topic}")).await);
        senders.push(ws_connect(a.addr, &format!("/ws/{topic}")).await);
    }
    for serve in [&a, &b] {
        subscribed(serve, 2).await;
    }
    const N: usize = 20;
    for (sender, topic) in senders.iter_mut().zip([&down_topic, &up_topic]) {
        send_all(sender, &format!("{topic} before"), N).await;
    }
    for (c, topic) in [&down_topic, &up_topic].into_iter().enumerate() {
        expect_sequence(&mut on_a[c..=c], &format!("{topic} before"), N).await;
        expect_sequence(&mut on_b[c..=c], &format!("{topic} before"), N).await;
    }

    // The master of one topic goes away: A's own clients still get everything.
    cluster.stop(down);
    for (sender, topic) in senders.iter_mut().zip([&down_topic, &up_topic]) {
        send_all(sender, &format!("{topic} during"), N).await;
    }
    for (c, topic) in [&down_topic, &up_topic].into_iter().enumerate() {
        expect_sequence(&mut on_a[c..=c], &format!("{topic} during"), N).await;
    }
    eventually("A notices the master is gone", async || {
        a.metric("ringsocket_broker_connected").await == Some(0)
    })
    .await;
    assert!(a.metric("ringsocket_broker_backlog_messages").await >= Some(1));
    // The other shards are not held up: B gets the other topic's messages while the
    // master is away.
    expect_sequence(&mut on_b[1..=1], &format!("{up_topic} during"), N).await;
    // More for both topics meanwhile: the other shard's still go, in order.
    for (sender, topic) in senders.iter_mut().zip([&down_topic, &up_topic]) {
        send_all(sender, &format!("{topic} still"), N).await;
    }
    for (c, topic) in [&down_topic, &up_topic].into_iter().enumerate() {
        expect_sequence(&mut on_a[c..=c], &format!("{topic} still"), N).await;
    }
    expect_sequence(&mut on_b[1..=1], &format!("{up_topic} still"), N).await;

    // It comes back, empty: both processes reconnect and resubscribe on their own,
    // and B gets what waited, in order, before what follows.
    cluster.restart(down);
    for serve in [&a, &b] {
        eventually("reconnected", async || {
            serve.metric("ringsocket_broker_connected").await == Some(1)
        })
        .await;
    }
    for (sender, topic) in senders.iter_mut().zip([&down_topic, &up_topic]) {
        send_all(sender, &format!("{topic} after"), N).await;
    }
    for (c, topic) in [&down_topic, &up_topic].into_iter().enumerate() {
        expect_sequence(&mut on_a[c..=c], &format!("{topic} after"), N).await;
        if c == 0 {
            expect_sequence(&mut on_b[c..=c], &format!("{topic} during"), N).await;
            expect_sequence(&mut on_b[c..=c], &format!("{topic} still"), N).await;
        }
        expect_sequence(&mut on_b[c..=c], &format!("{topic} after"), N).await;
    }
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_is_followed() {
    let cluster = RedisCluster::start();
    let a = serve(&cluster);
    let b = serve(&cluster);
    let (topic, from) = spread(&cluster, 1).remove(0);
    let slot = cluster.slot(&format!("ringsocket:{{{topic}}}"));
    let mut raw_b = ws_connect(b.addr, &format!("/ws/{topic}")).await;
    let mut sender = ws_connect(a.addr, &format!("/ws/{topic}")).await;
    let mut v1_b = v1(b.addr, "").await;
    let reply = subscribe(&mut v1_b, 1, &topic, None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for serve in [&a, &b] {
        subscribed(serve, 1).await;
    }
    const N: usize = 20;
    send_all(&mut sender, "before", N).await;
    expect_sequence(std::slice::from_mut(&mut raw_b), "before", N).await;
    let before = publications(&mut v1_b, N).await;
    assert_eq!(
        before.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=N as u64).collect::<Vec<_>>()
    );

    // The slot moves, keys and all, to another master.
    cluster.move_slot(slot, (from + 1) % MASTERS);
    send_all(&mut sender, "after", N).await;
    expect_sequence(std::slice::from_mut(&mut raw_b), "after", N).await;
    // The history moved with it: the offsets go on, in the same epoch.
    let after = publications(&mut v1_b, N).await;
    assert_eq!(
        after
            .iter()
            .map(|p| (p.0, p.1.as_str()))
            .collect::<Vec<_>>(),
        (N as u64 + 1..=2 * N as u64)
            .map(|o| (o, epoch.as_str()))
            .collect::<Vec<_>>()
    );
    // Whether A's publisher met a MOVED depends on timing (its slot map may have been
    // read again first, after B's subscriber saw the slot go): not asserted. What is
    // guaranteed: both processes follow the move, each still subscribed once on the
    // three shards and connected, with nothing failed.
    for serve in [&a, &b] {
        subscribed(serve, 1).await;
    }
    assert_eq!(
        a.metric("ringsocket_broker_publish_failed_total").await,
        Some(0)
    );
    assert_quiet(&mut raw_b, "B's raw client").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_checks_slot_moving_is_followed_without_reconnecting() {
    let cluster = RedisCluster::start();
    let a = serve(&cluster);
    let b = serve(&cluster);
    let (topic, _) = spread(&cluster, 1).remove(0);
    let mut raw_b = ws_connect(b.addr, &format!("/ws/{topic}")).await;
    let mut sender = ws_connect(a.addr, &format!("/ws/{topic}")).await;
    for serve in [&a, &b] {
        subscribed(serve, 1).await;
    }
    // The subscriber connection to node 0 checks its health on the first channel
    // `ringsocket:{\0<n>}` of a slot node 0 serves: that slot moves to node 1.
    let slot = (0..)
        .map(|n| cluster.slot(&format!("ringsocket:{{\0{n}}}")))
        .find(|&slot| cluster.owner(slot) == 0)
        .unwrap();
    let before = (reconnects(&a).await, reconnects(&b).await);
    cluster.move_slot(slot, 1);
    // Longer than a health interval (1 s) plus the I/O timeout (2 s): an unanswered
    // check would have cut the connection by now.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    assert_eq!((reconnects(&a).await, reconnects(&b).await), before);
    for serve in [&a, &b] {
        subscribed(serve, 1).await;
    }
    send_all(&mut sender, "still", 10).await;
    expect_sequence(std::slice::from_mut(&mut raw_b), "still", 10).await;
    assert_quiet(&mut raw_b, "B's raw client").await;
}

async fn reconnects(serve: &Serve) -> u64 {
    serve
        .metric("ringsocket_broker_reconnects_total")
        .await
        .unwrap_or(0)
}
