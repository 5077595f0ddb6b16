//! `ringsocket serve` child processes for the tests that join several of them, and
//! the waits those tests share.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{Client, PATIENCE, http_exchange};

/// A `ringsocket serve` child process, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct Serve {
    child: Child,
    pub addr: SocketAddr,
}

impl Serve {
    /// `ringsocket serve --redis redis_url`, two workers, on a free loopback port.
    pub fn start(redis_url: &str) -> Self {
        Self::with_args(&["--redis", redis_url])
    }

    /// `ringsocket serve` with `args`, two workers, on a free loopback port; waits for
    /// its listening line. `RINGSOCKET_IO_BACKEND` goes through (the suites run per
    /// backend); the test harness's other `RINGSOCKET_*` variables do not (the server
    /// refuses unknown ones).
    pub fn with_args(args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringsocket"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--workers", "2"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("RINGSOCKET_") && key != "RINGSOCKET_IO_BACKEND" {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().unwrap();
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

    /// The value of metric `name` (a full sample name) at `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<u64> {
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

/// The next text message (binary ones are skipped).
pub async fn next_text(client: &mut Client) -> String {
    loop {
        if let WsMessage::Text(text) = super::next_data(client).await {
            return text.to_string();
        }
    }
}

/// Nothing more arrives within a short while.
pub async fn assert_quiet(client: &mut Client, who: &str) {
    if let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(300), client.next()).await
    {
        panic!("{who} got an unexpected {message:?}");
    }
}

pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each client gets `{prefix} 0` .. `{prefix} {n-1}`, in order.
pub async fn expect_sequence(clients: &mut [Client], prefix: &str, n: usize) {
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
