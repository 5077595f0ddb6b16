//! Secrets never reach a log: JWTs (in the query, a header or a cookie, valid or not),
//! publish and metrics tokens (right or wrong), the JWT secret and the cookies the
//! connect hook forwards, with every crate logging at TRACE.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ringsocket::app::App;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{http_exchange, start};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

const SECRET: &str = "log-test-secret-log-test-secret-0";
const PUBLISH_TOKEN: &str = "PUBLISHTOKENabcdef0123456789";
const WRONG_PUBLISH: &str = "WRONGPUBLISHabcdef0123456789";
const METRICS_TOKEN: &str = "METRICSTOKENabcdef0123456789";
const WRONG_METRICS: &str = "WRONGMETRICSabcdef0123456789";
const SESSION: &str = "COOKIESESSIONabcdef0123456789";

fn token(exp: u64, key: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "logged-sub", "exp": exp}),
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

async fn handshake(addr: std::net::SocketAddr, target: &str, headers: &str) -> String {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A backend for `auth_url` that admits every handshake.
async fn backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let body = "{}";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn no_token_or_secret_reaches_the_log() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let valid = token(now + 600, SECRET);
    let expired = token(now - 10, SECRET);
    let forged = token(now + 600, "another-secret-another-secret-00");
    let server = start(App::standard(), |c| {
        c.jwt_secret = SECRET.into();
        c.jwt_cookie = "jwt".into();
        c.publish_token = vec![PUBLISH_TOKEN.into()];
        c.metrics_token = METRICS_TOKEN.into();
    });
    let addr = server.local_addr();
    let mut statuses = Vec::new();
    for t in [&valid, &expired, &forged] {
        statuses.push(handshake(addr, &format!("/ws/lobby?token={t}"), "").await);
        let bearer = format!("Authorization: Bearer {t}\r\n");
        statuses.push(handshake(addr, "/ws/lobby", &bearer).await);
        let cookie = format!("Cookie: jwt={t}\r\n");
        statuses.push(handshake(addr, "/ws/lobby", &cookie).await);
    }
    // A bad request line with a token in it is refused without echoing its target.
    statuses.push(handshake(addr, &format!("/ws/lob by?token={valid}"), "").await);
    for t in [PUBLISH_TOKEN, WRONG_PUBLISH] {
        let request = format!(
            "POST /publish/lobby HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
             Content-Length: 1\r\nConnection: close\r\n\r\nx"
        );
        let answer = http_exchange(addr, request.as_bytes()).await;
        statuses.push(answer.lines().next().unwrap_or_default().to_owned());
    }
    for t in [METRICS_TOKEN, WRONG_METRICS] {
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n"
        );
        let answer = http_exchange(addr, request.as_bytes()).await;
        statuses.push(answer.lines().next().unwrap_or_default().to_owned());
    }
    drop(server);

    let auth = backend().await;
    let hooked = start(App::standard(), |c| {
        c.auth_url = format!("http://{auth}/check")
    });
    statuses.push(
        handshake(
            hooked.local_addr(),
            "/ws/lobby",
            &format!("Cookie: session={SESSION}\r\n"),
        )
        .await,
    );
    drop(hooked);

    let joined = statuses.join("\n");
    for (i, want) in [
        "101", "101", "101", "401", "401", "401", "401", "401", "401", "400", "202", "403", "200",
        "403", "101",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            statuses[i].contains(want),
            "request {i}: expected {want}:\n{joined}"
        );
    }
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        log.contains("handshake refused: 401"),
        "the refusals are logged:\n{log}"
    );
    for secret in [
        valid.as_str(),
        expired.as_str(),
        forged.as_str(),
        SECRET,
        PUBLISH_TOKEN,
        WRONG_PUBLISH,
        METRICS_TOKEN,
        WRONG_METRICS,
        SESSION,
    ] {
        // A JWT's signature alone would be enough to replay a stolen token's prefix.
        let tail = &secret[secret.len() - 16..];
        assert!(
            !log.contains(tail),
            "a secret ({tail}…) is in the log:\n{log}"
        );
    }
}
