//! Two `ringsocket serve` processes joined by a throwaway `redis-server`: clients on
//! both get every message exactly once and in order; when Redis stops, local delivery
//! goes on and what is published waits in the backlog; when it comes back, both
//! processes reconnect and resubscribe on their own, and the other process gets what
//! waited, in order, before what follows.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Client, http_exchange, ws_connect};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PATIENCE: Duration = Duration::from_secs(15);

/// A `ringsocket serve` child process, stopped with SIGTERM on drop.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Serve {
    fn start(redis_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringsocket"))
            .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
            .args(["--redis", redis_url])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .strip_prefix("ringsocket listening on ")
            .and_then(|rest| {
                rest.split(':')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(":")
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| {
                // Not left running (holding the test harness's pipes) after the panic.
                let _ = child.kill();
                let _ = child.wait();
                panic!("unexpected first line {line:?}")
            });
        Self { child, addr }
    }

    async fn metric(&self, name: &str) -> Option<u64> {
        let text = http_exchange(
            self.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn next_text(client: &mut Client) -> String {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("timed out waiting for a message")
            .expect("stream ended")
            .expect("read failed");
        if let WsMessage::Text(text) = message {
            return text.to_string();
        }
    }
}

/// Nothing more arrives within a short while.
async fn assert_quiet(client: &mut Client, who: &str) {
    if let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(300), client.next()).await
    {
        panic!("{who} got an unexpected {message:?}");
    }
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn expect_sequence(clients: &mut [Client], prefix: &str, n: usize) {
    for (c, client) in clients.iter_mut().enumerate() {
        for i in 0..n {
            assert_eq!(
                next_text(client).await,
                format!("{prefix} {i}"),
                "client {c}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_rooms_through_redis_and_survive_its_restart() {
    let mut redis = RedisServer::start();
    let a = Serve::start(&redis.url());
    let b = Serve::start(&redis.url());
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
