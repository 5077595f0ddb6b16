//! Who may connect, subscribe and publish, with real clients (tokio-tungstenite, raw
//! HTTP): every rule's status or close code, its counter in
//! `ringsocket_rejections_total{reason}`, and a control client on the same server whose
//! echo keeps working while the rule fires.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ringsocket::app::{App, Grant};
use ringsocket::proto::Message as Message2;
use ringsocket::runtime::{Response, RunningServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use common::{Client, PATIENCE, http_exchange, start};

const SECRET: &str = "test-secret-test-secret-test-secret!";
const PUBLISH_TOKEN: &str = "publish-token-0123456789";
const METRICS_TOKEN: &str = "metrics-token-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A WebSocket handshake to `path` with `headers`: the client, or the refusal's status
/// and body.
async fn handshake(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, (u16, String)> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = name.parse().unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .expect("the handshake timed out")
    {
        Ok((client, _)) => Ok(client),
        Err(WsError::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((response.status().as_u16(), body))
        }
        Err(e) => panic!("handshake to {path} failed: {e}"),
    }
}

async fn refused(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match handshake(addr, path, headers).await {
        Ok(_) => panic!("{path} was accepted"),
        Err(refusal) => refusal,
    }
}

/// The count of `ringsocket_rejections_total{reason="…"}`.
fn rejections(server: &RunningServer, reason: &str) -> u64 {
    let series = format!("ringsocket_rejections_total{{reason=\"{reason}\"}} ");
    let text = server.metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// A connected /echo client: it must keep echoing while rules fire around it.
async fn control(addr: SocketAddr) -> Client {
    common::ws_connect(addr, "/echo").await
}

async fn assert_echoes(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, client.next())
        .await
        .expect("no echo in time")
        .expect("the control connection ended")
        .unwrap();
    assert_eq!(reply, Message::text(text), "the control client's echo");
}

/// The close frame's code and reason the server sent next on `client` (data messages
/// before it are skipped).
async fn close_of(client: &mut Client) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("no close in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) => panic!("a close without a code"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

async fn next_text(client: &mut Client) -> String {
    loop {
        match tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("no message in time")
        {
            Some(Ok(Message::Text(text))) => return text.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// A raw HTTP request with `headers`, `Connection: close`.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str], body: &str) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    http_exchange(addr, request.as_bytes()).await
}

#[tokio::test]
async fn a_page_from_another_origin_gets_403_before_the_upgrade() {
    let server = start(App::standard(), |c| {
        c.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.example.org".into(),
        ];
    });
    let addr = server.local_addr();
    let mut control = control(addr).await;
    for origin in [
        "https://evil.example",
        "http://app.example.com",
        "https://example.org",
    ] {
        let (status, body) = refused(addr, "/ws/lobby", &[("Origin", origin)]).await;
        assert_eq!(status, 403, "{origin}");
        assert!(body.contains("origin not allowed"), "{body}");
        assert_echoes(&mut control, origin).await;
    }
    assert_eq!(rejections(&server, "origin"), 3);
    for origin in ["https://app.example.com", "https://a.b.example.org"] {
        handshake(addr, "/ws/lobby", &[("Origin", origin)])
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e:?}"));
    }
    // Not a browser: no Origin, no cross-site page to protect against.
    handshake(addr, "/ws/lobby", &[]).await.unwrap();
    assert_eq!(rejections(&server, "origin"), 3);
}

#[tokio::test]
async fn subscribers_need_a_valid_jwt_and_get_only_its_topics() {
    let server = start(App::standard(), |c| {
        c.jwt_secret = SECRET.into();
        c.jwt_cookie = "jwt".into();
    });
    let addr = server.local_addr();
    let token = hs256(json!({"sub": "alice", "exp": now() + 600, "topics": ["lobby", "chat:*"]}));
    let mut control = handshake(addr, &format!("/echo?token={token}"), &[])
        .await
        .unwrap();
    assert_echoes(&mut control, "hello").await;

    let (status, body) = refused(addr, "/ws/lobby", &[]).await;
    assert_eq!(
        (status, body.contains("a token is required")),
        (401, true),
        "{body}"
    );
    let expired = hs256(json!({"sub": "bob", "exp": now() - 5}));
    let (status, body) = refused(addr, &format!("/ws/lobby?token={expired}"), &[]).await;
    assert_eq!((status, body.contains("expired")), (401, true), "{body}");
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mallory", "exp": now() + 600}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-!!"),
    )
    .unwrap();
    let bearer = format!("Bearer {forged}");
    let (status, body) = refused(addr, "/ws/lobby", &[("Authorization", &bearer)]).await;
    assert_eq!(
        (status, body.contains("bad signature")),
        (401, true),
        "{body}"
    );
    assert_eq!(rejections(&server, "unauthorized"), 3);
    assert_echoes(&mut control, "still here").await;

    // The token's topics: allowed ones open, the others get 403 before the upgrade.
    let bearer = format!("Bearer {token}");
    handshake(addr, "/ws/lobby", &[("Authorization", &bearer)])
        .await
        .unwrap();
    let cookie = format!("theme=dark; jwt={token}");
    handshake(addr, "/ws/chat:7", &[("Cookie", &cookie)])
        .await
        .unwrap();
    let (status, body) = refused(addr, "/ws/admin", &[("Cookie", &cookie)]).await;
    assert_eq!(
        (status, body.contains("topic not allowed")),
        (403, true),
        "{body}"
    );
    assert_eq!(rejections(&server, "topic"), 1);
    assert_echoes(&mut control, "and here").await;
}

#[tokio::test]
async fn a_client_publishes_only_where_its_token_says() {
    let server = start(App::standard(), |c| c.jwt_secret = SECRET.into());
    let addr = server.local_addr();
    let reader = hs256(json!({"sub": "reader", "exp": now() + 600}));
    let writer = hs256(json!({"sub": "writer", "exp": now() + 600, "publish": ["lobby"]}));
    let mut listener = handshake(addr, &format!("/ws/lobby?token={reader}"), &[])
        .await
        .unwrap();
    let mut writer = handshake(addr, &format!("/ws/lobby?token={writer}"), &[])
        .await
        .unwrap();
    let mut reader = handshake(addr, &format!("/ws/lobby?token={reader}"), &[])
        .await
        .unwrap();
    // Both are subscribed on their cores before anything is published.
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.send(Message::text("from the writer")).await.unwrap();
    assert_eq!(next_text(&mut listener).await, "from the writer");
    reader.send(Message::text("from the reader")).await.unwrap();
    let (code, reason) = close_of(&mut reader).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "not allowed to publish")
    );
    assert_eq!(rejections(&server, "publish_not_allowed"), 1);
    writer.send(Message::text("again")).await.unwrap();
    assert_eq!(
        next_text(&mut listener).await,
        "again",
        "the reader's message never arrived"
    );
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let server = start(App::standard(), |c| c.jwt_secret = SECRET.into());
    let addr = server.local_addr();
    let long = hs256(json!({"sub": "long", "exp": now() + 600}));
    let mut control = handshake(addr, &format!("/echo?token={long}"), &[])
        .await
        .unwrap();
    let short = hs256(json!({"sub": "short", "exp": now() + 2}));
    let started = std::time::Instant::now();
    let mut short = handshake(addr, &format!("/ws/lobby?token={short}"), &[])
        .await
        .unwrap();
    let (code, reason) = close_of(&mut short).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "token expired")
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(rejections(&server, "token_expired"), 1);
    assert_echoes(&mut control, "unharmed").await;
}

#[tokio::test]
async fn es256_tokens_verify_with_the_public_key_file() {
    let pair = rcgen::KeyPair::generate().unwrap();
    let dir = std::env::temp_dir().join(format!("rs-access-es256-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("jwt.pub.pem");
    std::fs::write(&key_file, pair.public_key_pem()).unwrap();
    let server = start(App::standard(), |c| {
        c.jwt_public_key = key_file.to_str().unwrap().into();
    });
    let addr = server.local_addr();
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    let claims = json!({"sub": "carol", "exp": now() + 600});
    let token = encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap();
    let mut client = handshake(addr, &format!("/echo?token={token}"), &[])
        .await
        .unwrap();
    assert_echoes(&mut client, "signed").await;
    // An HS256 token made with the public key as its secret (algorithm confusion).
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(pair.public_key_pem().as_bytes()),
    )
    .unwrap();
    let (status, _) = refused(addr, &format!("/echo?token={forged}"), &[]).await;
    assert_eq!(status, 401);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_publish_api_needs_its_bearer_token() {
    let server = start(App::standard(), |c| {
        c.publish_token = vec![PUBLISH_TOKEN.into()]
    });
    let addr = server.local_addr();
    let mut control = control(addr).await;
    let mut subscriber = common::ws_connect(addr, "/ws/news").await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let missing = http(addr, "POST", "/publish/news", &[], "nope").await;
    assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
    assert!(missing.contains("WWW-Authenticate: Bearer"), "{missing}");
    let wrong = http(
        addr,
        "POST",
        "/publish/news",
        &["Authorization: Bearer publish-token-0123456788"],
        "nope",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 403"), "{wrong}");
    assert_echoes(&mut control, "between").await;
    let auth = format!("Authorization: Bearer {PUBLISH_TOKEN}");
    let ok = http(addr, "POST", "/publish/news", &[&auth], "extra!").await;
    assert!(ok.starts_with("HTTP/1.1 202"), "{ok}");
    assert_eq!(
        next_text(&mut subscriber).await,
        "extra!",
        "only the authorized publish arrives"
    );
    assert_eq!(rejections(&server, "publish_token"), 2);
    let bad_name = http(addr, "POST", "/publish/a%20b", &[&auth], "x").await;
    assert!(bad_name.starts_with("HTTP/1.1 400"), "{bad_name}");
    assert!(
        bad_name.contains("is not allowed in a topic name"),
        "{bad_name}"
    );
    assert_eq!(rejections(&server, "topic_name"), 1);
}

#[tokio::test]
async fn without_a_token_the_publish_api_is_closed_beyond_loopback() {
    let server = start(App::standard(), |c| c.bind = "0.0.0.0:0".parse().unwrap());
    let port = server.local_addr().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let answer = http(addr, "POST", "/publish/news", &[], "x").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("no publish_token is set"), "{answer}");
    // On loopback (every other test here), it is open: see the rooms tests.
}

#[tokio::test]
async fn metrics_need_the_metrics_token_when_one_is_set() {
    let server = start(App::standard(), |c| c.metrics_token = METRICS_TOKEN.into());
    let addr = server.local_addr();
    let missing = http(addr, "GET", "/metrics", &[], "").await;
    assert!(missing.starts_with("HTTP/1.1 401"), "{missing}");
    assert!(
        missing.contains("WWW-Authenticate: Bearer realm=\"metrics\""),
        "{missing}"
    );
    let wrong = http(
        addr,
        "GET",
        "/metrics",
        &["Authorization: Bearer metrics-token-x"],
        "",
    )
    .await;
    assert!(wrong.starts_with("HTTP/1.1 403"), "{wrong}");
    let auth = format!("Authorization: Bearer {METRICS_TOKEN}");
    let ok = http(addr, "GET", "/metrics", &[&auth], "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("ringsocket_rejections_total{reason=\"metrics_token\"} 2"),
        "{ok}"
    );
    let health = http(addr, "GET", "/healthz", &[], "").await;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "health checks need no token: {health}"
    );
}

#[tokio::test]
async fn topic_names_and_counts_have_limits() {
    let app = App::standard().websocket("/multi", |ws| async move {
        ws.accept();
        while let Ok(Message2::Text(topic)) = ws.recv().await {
            let answer = match ws.subscribe(&topic) {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("refused: {e}"),
            };
            let _ = ws.send_text(answer);
        }
    });
    let server = start(app, |c| {
        c.max_topics_per_connection = 3;
        c.max_topic_length = 16;
    });
    let addr = server.local_addr();
    let mut control = control(addr).await;
    let (status, body) = refused(addr, "/ws/a%20b", &[]).await;
    assert_eq!(
        (status, body.contains("is not allowed in a topic name")),
        (400, true),
        "{body}"
    );
    let (status, _) = refused(addr, &format!("/ws/{}", "x".repeat(17)), &[]).await;
    assert_eq!(status, 400);
    assert_eq!(rejections(&server, "topic_name"), 2);
    let mut multi = common::ws_connect(addr, "/multi").await;
    for (topic, answer) in [
        ("a", "ok"),
        ("b", "ok"),
        ("c", "ok"),
        ("a", "ok"),
        ("d", "refused"),
    ] {
        multi.send(Message::text(topic)).await.unwrap();
        let got = next_text(&mut multi).await;
        assert!(got.starts_with(answer), "{topic}: {got}");
    }
    assert_eq!(rejections(&server, "topics_per_connection"), 1);
    assert_echoes(&mut control, "fine").await;
}

/// A team's backend for `auth_url`, on a real socket: admits `session=good`, is slow
/// for `session=slow`, refuses anything else with 401; records what it was sent.
async fn auth_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let text = String::from_utf8_lossy(&head[..end]).to_lowercase();
                    head.drain(..end);
                    log.lock().unwrap().push(text.clone());
                    let answer = if text.contains("session=good") {
                        let body = r#"{"sub":"dave","topics":["lobby"],"publish":["lobby"]}"#;
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    } else if text.contains("session=slow") {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_owned()
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n".to_owned()
                    };
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn auth_url_admits_refuses_and_times_out() {
    let (backend, seen) = auth_backend().await;
    let server = start(App::standard(), |c| {
        c.auth_url = format!("http://{backend}/ws-auth");
        c.auth_timeout_secs = 0.5;
    });
    let addr = server.local_addr();
    let mut control = handshake(addr, "/echo", &[("Cookie", "session=good")])
        .await
        .unwrap();
    assert_echoes(&mut control, "admitted").await;
    let mut lobby = handshake(
        addr,
        "/ws/lobby?room=1",
        &[
            ("Cookie", "session=good"),
            ("Origin", "https://app.example.com"),
        ],
    )
    .await
    .unwrap();
    let (status, _) = refused(addr, "/ws/admin", &[("Cookie", "session=good")]).await;
    assert_eq!(status, 403, "the backend's topics apply");
    let (status, _) = refused(addr, "/ws/lobby", &[("Cookie", "session=bad")]).await;
    assert_eq!(status, 401, "the backend's status is passed on");
    let started = std::time::Instant::now();
    let (status, body) = refused(addr, "/ws/lobby", &[("Cookie", "session=slow")]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rejections(&server, "auth_hook"), 2);
    assert_echoes(&mut control, "unharmed").await;
    lobby.send(Message::text("hi")).await.unwrap();
    assert_echoes(&mut control, "after a publish").await;
    let seen = seen.lock().unwrap().join("\n---\n");
    assert!(seen.contains("get /ws-auth http/1.1"), "{seen}");
    assert!(seen.contains("cookie: session=good"), "{seen}");
    assert!(seen.contains("origin: https://app.example.com"), "{seen}");
    assert!(seen.contains("x-original-uri: /ws/lobby?room=1"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
}

#[tokio::test]
async fn the_authorize_hook_decides_with_the_request_in_hand() {
    let app = App::echo().authorize(|req| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match req.request().header_str("x-api-key") {
            Some("k-1") => Ok(Grant::new("svc-1")),
            Some(_) => Err(Response::error(403, "unknown key")),
            None => Err(Response::error(401, "an x-api-key is required")),
        }
    });
    let server = start(app, |_| {});
    let addr = server.local_addr();
    let mut ok = handshake(addr, "/echo", &[("x-api-key", "k-1")])
        .await
        .unwrap();
    assert_echoes(&mut ok, "in").await;
    assert_eq!(refused(addr, "/echo", &[("x-api-key", "k-2")]).await.0, 403);
    let (status, body) = refused(addr, "/echo", &[]).await;
    assert_eq!((status, body.as_str()), (401, "an x-api-key is required\n"));
    assert_eq!(rejections(&server, "auth_hook"), 2);
    assert_echoes(&mut ok, "still in").await;
}

#[tokio::test]
async fn a_token_that_expires_while_the_hook_decides_is_refused() {
    let app = App::standard().authorize(|_req| async move {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        Ok(Grant::default())
    });
    let server = start(app, |c| c.jwt_secret = SECRET.into());
    let addr = server.local_addr();
    // Whole seconds: 1.0 to 2.0 s from now, so before the hook's 2.5 s are over.
    let token = hs256(json!({"sub": "late", "exp": now() + 1}));
    let (status, body) = refused(addr, &format!("/echo?token={token}"), &[]).await;
    assert_eq!((status, body.as_str()), (401, "invalid token: expired\n"));
    assert_eq!(rejections(&server, "token_expired"), 1);
}
