//! The shared broker suite: one set of tests, run against every broker through a
//! fixture that starts the broker's server (if any) and two `ringsocket serve`
//! processes joined by it (`--broker X` and its URL):
//!
//! - exactly once and in order across two nodes (WebSocket rooms and the HTTP API);
//! - local delivery while the broker is away, and resume after it returns (what
//!   waited is delivered to the other node, in order, before what follows);
//! - `ringsocket.v1` recovery (`subscribe` with `since`) on the other node;
//! - the same after a broker restart: recovered where the broker keeps its history
//!   (JetStream's store), a new epoch where it does not (a Redis without persistence).
//!
//! The local broker joins no processes: its fixture runs one node, and the parts of
//! each test that need a second node are skipped with the reason printed.
//!
//! A new broker is a [`Fixture`] and one line: `broker_suite!(name, Fixture);`.
#![allow(clippy::unwrap_used)]

mod common;

use common::nats::NatsServer;
use common::redis::RedisServer;
use common::redis_cluster::RedisCluster;
use common::serve::{Serve, assert_quiet, eventually, expect_sequence};
use common::v1::{next, subscribe, v1};
use common::{Client, http_exchange, ws_connect};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A broker under test: its server, and how `ringsocket serve` reaches it.
trait Fixture: Sized {
    /// Named in skip lines.
    const NAME: &'static str;
    /// Starts the broker's server, if it has one.
    fn start() -> Self;
    /// The `serve` flags that select this broker.
    fn args(&self) -> Vec<String>;
    /// Why the cases that need two nodes do not apply, if they do not.
    fn single_node() -> Option<&'static str> {
        None
    }
    /// Stops the broker's server (its clients see the connection drop).
    fn stop(&mut self);
    /// Starts it again on the same address.
    fn restart(&mut self);
    /// Whether what the broker kept (offsets, history) survives [`Fixture::restart`].
    fn keeps_history(&self) -> bool;
}

/// No broker: one process.
struct Local;

impl Fixture for Local {
    const NAME: &'static str = "local";
    fn start() -> Self {
        Self
    }
    fn args(&self) -> Vec<String> {
        vec!["--broker".into(), "local".into()]
    }
    fn single_node() -> Option<&'static str> {
        Some("the local broker joins no processes: there is no other node")
    }
    fn stop(&mut self) {}
    fn restart(&mut self) {}
    fn keeps_history(&self) -> bool {
        false
    }
}

/// A `redis-server` without persistence.
struct Redis(RedisServer);

impl Fixture for Redis {
    const NAME: &'static str = "redis";
    fn start() -> Self {
        Self(RedisServer::start())
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "redis".into(),
            "--redis".into(),
            self.0.url(),
        ]
    }
    fn stop(&mut self) {
        self.0.stop();
    }
    fn restart(&mut self) {
        self.0.restart();
    }
    fn keeps_history(&self) -> bool {
        false
    }
}

/// A Redis Cluster of three masters without persistence (`redis_cluster = true`); away
/// and back means all three stop, then restart empty and rejoin.
struct Cluster(RedisCluster);

impl Fixture for Cluster {
    const NAME: &'static str = "redis_cluster";
    fn start() -> Self {
        Self(RedisCluster::start())
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "redis".into(),
            "--redis-cluster".into(),
            "--redis".into(),
            self.0.url(),
        ]
    }
    fn stop(&mut self) {
        self.0.stop_all();
    }
    fn restart(&mut self) {
        self.0.restart_all();
    }
    fn keeps_history(&self) -> bool {
        false
    }
}

/// A `nats-server -js` with its own store directory (kept across restarts).
struct Nats(NatsServer);

impl Fixture for Nats {
    const NAME: &'static str = "nats";
    fn start() -> Self {
        Self(NatsServer::start())
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--broker".into(),
            "nats".into(),
            "--nats".into(),
            self.0.url(),
        ]
    }
    fn stop(&mut self) {
        self.0.stop();
    }
    fn restart(&mut self) {
        self.0.restart();
    }
    fn keeps_history(&self) -> bool {
        true
    }
}

/// Runs each case of the suite against `$fixture`, in module `$name`.
macro_rules! broker_suite {
    ($name:ident, $fixture:ty) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exactly_once_in_order_across_nodes() {
                super::exactly_once_in_order::<$fixture>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local_delivery_while_away_then_resume() {
                super::away_and_back::<$fixture>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v1_recovery_on_the_other_node() {
                super::v1_recovery::<$fixture>().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn v1_recovery_after_a_broker_restart() {
                super::v1_after_restart::<$fixture>().await;
            }
        }
    };
}

broker_suite!(local, super::Local);
broker_suite!(redis, super::Redis);
broker_suite!(redis_cluster, super::Cluster);
broker_suite!(nats, super::Nats);

/// One or two nodes on the fixture's broker.
struct Nodes {
    a: Serve,
    b: Option<Serve>,
}

impl Nodes {
    fn start<F: Fixture>(broker: &F) -> Self {
        let args = broker.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let a = Serve::with_args(&args);
        let b = F::single_node().is_none().then(|| Serve::with_args(&args));
        Self { a, b }
    }

    /// Node B, or A when there is one node.
    fn other(&self) -> &Serve {
        self.b.as_ref().unwrap_or(&self.a)
    }

    fn all(&self) -> impl Iterator<Item = &Serve> {
        std::iter::once(&self.a).chain(self.b.as_ref())
    }

    /// Waits until every node listens to `n` topics at its broker (nothing to wait
    /// for without one).
    async fn subscribed(&self, n: u64) {
        for node in self.all() {
            subscribed(node, n).await;
        }
    }

    /// Waits until every node is connected to its broker again after a loss.
    async fn reconnected(&self) {
        for node in self.all() {
            eventually("reconnected to the broker", async || {
                node.metric("ringsocket_broker_connected").await == Some(1)
                    && node.metric("ringsocket_broker_reconnects_total").await >= Some(1)
            })
            .await;
        }
    }
}

/// Waits until `node` listens to `n` topics at its broker (nothing to wait for
/// without one).
async fn subscribed(node: &Serve, n: u64) {
    if node
        .metric("ringsocket_broker_subscriptions")
        .await
        .is_none()
    {
        return;
    }
    eventually("subscribed at the broker", async || {
        node.metric("ringsocket_broker_subscriptions").await >= Some(n)
    })
    .await;
}

/// Says which part of a case is skipped for this broker, and why.
fn skip<F: Fixture>(what: &str) {
    if let Some(reason) = F::single_node() {
        say(&format!(
            "broker suite [{}]: {what}: skipped: {reason}",
            F::NAME
        ));
    }
}

/// A line on the test's stderr that the harness shows even when the test passes
/// (`eprintln!` is captured).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

async fn publish_http(node: &Serve, topic: &str, body: &str) {
    let response = http_exchange(
        node.addr,
        format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
}

async fn room_members(node: &Serve, n: usize) -> Vec<Client> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(ws_connect(node.addr, "/ws/room").await);
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

/// Rooms on both nodes: a sender's messages and HTTP publishes on either node reach
/// every member once, in order, the sender's own node included.
async fn exactly_once_in_order<F: Fixture>() {
    let broker = F::start();
    let nodes = Nodes::start(&broker);
    let mut on_a = room_members(&nodes.a, 2).await;
    let mut on_b = match &nodes.b {
        Some(b) => room_members(b, 2).await,
        None => Vec::new(),
    };
    let mut sender = ws_connect(nodes.a.addr, "/ws/room").await;
    nodes.subscribed(1).await;

    const N: usize = 100;
    send_all(&mut sender, "ws", N).await;
    expect_sequence(&mut on_a, "ws", N).await;
    expect_sequence(&mut on_b, "ws", N).await;
    // HTTP publishes on the other node reach A's members, the sender included.
    for i in 0..3 {
        publish_http(nodes.other(), "room", &format!("http {i}")).await;
    }
    expect_sequence(&mut on_a, "http", 3).await;
    expect_sequence(&mut on_b, "http", 3).await;
    expect_sequence(std::slice::from_mut(&mut sender), "http", 3).await;
    skip::<F>("delivery on a second node");
    for (i, client) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        assert_quiet(client, &format!("client {i}")).await;
    }
    assert_quiet(&mut sender, "the sender").await;
    for node in nodes.all() {
        if let Some(failed) = node.metric("ringsocket_broker_publish_failed_total").await {
            assert_eq!(failed, 0);
        }
    }
}

/// The broker goes away: A's own members still get every message, and what is
/// published waits in A's backlog. It comes back: both nodes reconnect by themselves,
/// and B gets what waited, in order, then what follows.
async fn away_and_back<F: Fixture>() {
    let mut broker = F::start();
    let nodes = Nodes::start(&broker);
    let mut on_a = room_members(&nodes.a, 2).await;
    let mut on_b = match &nodes.b {
        Some(b) => room_members(b, 2).await,
        None => Vec::new(),
    };
    let mut sender = ws_connect(nodes.a.addr, "/ws/room").await;
    nodes.subscribed(1).await;
    send_all(&mut sender, "before", 10).await;
    expect_sequence(&mut on_a, "before", 10).await;
    expect_sequence(&mut on_b, "before", 10).await;

    broker.stop();
    const M: usize = 20;
    send_all(&mut sender, "during", M).await;
    // Local delivery goes on.
    expect_sequence(&mut on_a, "during", M).await;
    let Some(b) = &nodes.b else {
        skip::<F>("the backlog and the resume on the other node");
        return;
    };
    eventually("A notices the broker is gone", async || {
        nodes.a.metric("ringsocket_broker_connected").await == Some(0)
    })
    .await;
    assert_eq!(
        nodes.a.metric("ringsocket_broker_backlog_messages").await,
        Some(M as u64),
        "held in A's backlog, not dropped"
    );

    broker.restart();
    nodes.reconnected().await;
    const N: usize = 50;
    send_all(&mut sender, "after", N).await;
    expect_sequence(&mut on_a, "after", N).await;
    // B missed nothing: what waited came first, in order, then the rest.
    expect_sequence(&mut on_b, "during", M).await;
    expect_sequence(&mut on_b, "after", N).await;
    for node in [&nodes.a, b] {
        assert_eq!(
            node.metric("ringsocket_broker_publish_failed_total").await,
            Some(0)
        );
    }
    assert_eq!(
        nodes.a.metric("ringsocket_broker_backlog_messages").await,
        Some(0)
    );
    for (i, client) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        assert_quiet(client, &format!("client {i}")).await;
    }
}

/// The offsets, epochs and data of the next `n` publications.
async fn publications(client: &mut Client, n: usize) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let frame = next(client).await;
        assert_eq!(frame["type"], "pub", "{frame}");
        out.push((
            frame["offset"].as_u64().unwrap(),
            frame["epoch"].as_str().unwrap().to_owned(),
            frame["data"].clone(),
        ));
    }
    out
}

fn numbered(range: std::ops::RangeInclusive<u64>, epoch: &str) -> Vec<(u64, String, Value)> {
    range.map(|i| (i, epoch.to_owned(), json!(i))).collect()
}

/// Both nodes number a topic alike; a client that leaves A and comes back on B with
/// `since` recovers what it missed, then gets what follows.
async fn v1_recovery<F: Fixture>() {
    let broker = F::start();
    let nodes = Nodes::start(&broker);
    let (a, b) = (&nodes.a, nodes.other());
    let mut on_a = v1(a.addr, "").await;
    let epoch = subscribe(&mut on_a, 1, "news", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut on_b = match &nodes.b {
        Some(b) => {
            let mut client = v1(b.addr, "").await;
            let reply = subscribe(&mut client, 1, "news", None).await;
            assert_eq!(reply["epoch"], epoch.as_str(), "one epoch for every node");
            Some(client)
        }
        None => None,
    };
    nodes.subscribed(1).await;
    for i in 1..=5 {
        publish_http(a, "news", &i.to_string()).await;
    }
    assert_eq!(publications(&mut on_a, 5).await, numbered(1..=5, &epoch));
    if let Some(on_b) = &mut on_b {
        assert_eq!(
            publications(on_b, 5).await,
            numbered(1..=5, &epoch),
            "node B"
        );
    }

    // The client goes; five more are published on B; it comes back on B.
    drop(on_a);
    for i in 6..=10 {
        publish_http(b, "news", &i.to_string()).await;
    }
    if let Some(on_b) = &mut on_b {
        assert_eq!(publications(on_b, 5).await, numbered(6..=10, &epoch));
    }
    skip::<F>("recovery on another node (recovered on the same one)");
    let mut back = v1(b.addr, "").await;
    let reply = subscribe(&mut back, 2, "news", Some((5, &epoch))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(true), Some(5)),
        "{reply}"
    );
    assert_eq!(publications(&mut back, 5).await, numbered(6..=10, &epoch));
    publish_http(a, "news", "11").await;
    assert_eq!(publications(&mut back, 1).await, numbered(11..=11, &epoch));
}

/// After a broker restart: a client recovers on the other node where the broker kept
/// its history, and numbering goes on in the same epoch; where it did not, the next
/// publication starts a new epoch at 1 and the client is told it did not recover.
async fn v1_after_restart<F: Fixture>() {
    if F::single_node().is_some() {
        say(&format!(
            "broker suite [{}]: recovery after a broker restart: skipped: no broker to restart",
            F::NAME
        ));
        return;
    }
    let mut broker = F::start();
    let nodes = Nodes::start(&broker);
    let (a, b) = (&nodes.a, nodes.other());
    let mut on_a = v1(a.addr, "").await;
    let epoch = subscribe(&mut on_a, 1, "r", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    subscribed(a, 1).await;
    for i in 1..=3 {
        publish_http(a, "r", &i.to_string()).await;
    }
    assert_eq!(publications(&mut on_a, 3).await, numbered(1..=3, &epoch));

    broker.restart();
    nodes.reconnected().await;
    let mut on_b = v1(b.addr, "").await;
    if broker.keeps_history() {
        let reply = subscribe(&mut on_b, 1, "r", Some((1, &epoch))).await;
        assert_eq!(
            (reply["recovered"].as_bool(), reply["missed"].as_u64()),
            (Some(true), Some(2)),
            "{reply}"
        );
        assert_eq!(publications(&mut on_b, 2).await, numbered(2..=3, &epoch));
        nodes.subscribed(1).await;
        publish_http(b, "r", "4").await;
        assert_eq!(publications(&mut on_b, 1).await, numbered(4..=4, &epoch));
        assert_eq!(publications(&mut on_a, 1).await, numbered(4..=4, &epoch));
    } else {
        let reply = subscribe(&mut on_b, 1, "r", Some((3, &epoch))).await;
        assert_eq!(reply["recovered"].as_bool(), Some(false), "{reply}");
        let new_epoch = reply["epoch"].as_str().unwrap().to_owned();
        assert_ne!(new_epoch, epoch, "a new epoch: the history is gone");
        nodes.subscribed(1).await;
        publish_http(b, "r", "1").await;
        assert_eq!(
            publications(&mut on_b, 1).await,
            numbered(1..=1, &new_epoch)
        );
    }
}
