//! Helpers shared by the loopback server tests.
#![allow(dead_code, clippy::unwrap_used)]

pub mod nats;
pub mod redis;
pub mod redis_cluster;
#[cfg(feature = "cli")]
pub mod serve;
pub mod tls;
pub mod v1;

use std::sync::Arc;

use ringsocket::app::App;
use ringsocket::config::{Config, IoBackend};
use ringsocket::runtime::{Backend, RunningServer, Server};

/// The default configuration, on the I/O backend `RINGSOCKET_IO_BACKEND` names if set
/// (`.ci/run` runs the suite once per backend).
pub fn config() -> Config {
    let mut config = Config::default();
    if let Ok(backend) = std::env::var("RINGSOCKET_IO_BACKEND") {
        config.io_backend = backend.parse().expect("RINGSOCKET_IO_BACKEND");
    }
    config
}

/// A server on an ephemeral loopback port with two workers, after `tweak`.
pub fn start(app: App, tweak: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = config();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 2;
    config.shutdown_timeout_secs = 2.0;
    tweak(&mut config);
    let asked = config.io_backend;
    let server = Server::start(config, Arc::new(app)).unwrap();
    // The suite really runs on the backend it was asked for.
    match asked {
        IoBackend::Epoll => assert_eq!(server.backend(), Backend::Epoll),
        IoBackend::IoUring => assert_eq!(server.backend(), Backend::IoUring),
        _ => {}
    }
    server
}

/// The longest one await on a server may take in the shared helpers below.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// The next data message (text or binary), failing the test on timeout, close or
/// error.
pub async fn next_data(client: &mut Client) -> tokio_tungstenite::tungstenite::Message {
    use futures_util::StreamExt;
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("timed out waiting for a message")
            .expect("stream ended")
            .expect("read failed");
        if message.is_text() || message.is_binary() {
            return message;
        }
    }
}

/// A tokio-tungstenite client connection.
pub type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `ws://{addr}{path}` with tokio-tungstenite (an independent
/// client), failing the test on timeout or refusal.
pub async fn ws_connect(addr: std::net::SocketAddr, path: &str) -> Client {
    tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{addr}{path}")),
    )
    .await
    .expect("connect timed out")
    .expect("handshake failed")
    .0
}

/// Sends a raw HTTP request and returns the whole response (the request should say
/// `Connection: close`).
pub async fn http_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A client frame written by hand: `first_byte` (FIN, RSV, opcode), the mask bit and
/// length, a fixed masking key and the masked payload (RFC 6455 §5.2, §5.3).
pub fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![first_byte];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}
