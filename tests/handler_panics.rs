//! A handler that panics ends only its own request or connection: HTTP gets 500, a
//! WebSocket gets Close 1011, the worker and every other connection carry on, and the
//! connection is counted closed.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::config::Config;
use ringsocket::runtime::{Response, RunningServer, Server};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn start() -> RunningServer {
    let app = App::new()
        .get("/boom", |_req| async move {
            if std::hint::black_box(true) {
                panic!("HTTP handler exploded");
            }
            Response::text(200, "unreachable")
        })
        .websocket("/ws/boom-on-message", |ws| async move {
            ws.accept();
            if ws.recv().await.is_ok() {
                panic!("WebSocket handler exploded");
            }
        })
        .websocket("/ws/boom-before-accept", |_ws| async move {
            panic!("exploded before accepting");
        })
        .websocket("/echo", ringsocket::app::echo);
    let mut config = Config::default();
    if let Ok(backend) = std::env::var("RINGSOCKET_IO_BACKEND") {
        config.io_backend = backend.parse().expect("RINGSOCKET_IO_BACKEND");
    }
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.workers = 1;
    Server::start(config, Arc::new(app)).unwrap()
}

fn http_get(server: &RunningServer, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(server.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out);
    out
}

/// `ringsocket_handler_panics_total{kind="…"}`.
fn panics(server: &RunningServer, kind: &str) -> u64 {
    let text = server.metrics().render();
    let series = format!("ringsocket_handler_panics_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn wait_for_no_connections(server: &RunningServer) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metrics().open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "connections still open: {}",
            server.metrics().render()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn http_handler_panic_answers_500_and_the_server_carries_on() {
    let server = start();
    let response = http_get(&server, "/boom");
    assert!(
        response.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
        "{response}"
    );
    assert_eq!(panics(&server, "http"), 1);
    assert_eq!(panics(&server, "websocket"), 0);
    let response = http_get(&server, "/healthz");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert_eq!(panics(&server, "http"), 1, "a 200 is no panic");
    wait_for_no_connections(&server);
}

#[tokio::test]
async fn websocket_handler_panic_closes_with_1011_and_spares_other_connections() {
    let server = start();
    let addr = server.local_addr();
    let (mut bystander, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
        .await
        .unwrap();
    let (mut victim, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/boom-on-message"))
            .await
            .unwrap();
    victim.send(WsMessage::text("trigger")).await.unwrap();
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(message) = victim.next().await {
            if let Ok(WsMessage::Close(frame)) = message {
                return frame;
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("a close frame");
    assert_eq!(close.code, CloseCode::Error);
    assert_eq!(panics(&server, "websocket"), 1);
    assert_eq!(panics(&server, "http"), 0);

    bystander.send(WsMessage::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), bystander.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, WsMessage::text("still here"));
    bystander.close(None).await.unwrap();
    drop(victim);
    drop(bystander);
    tokio::task::spawn_blocking(move || wait_for_no_connections(&server))
        .await
        .unwrap();
}

#[tokio::test]
async fn websocket_handler_panic_before_accept_answers_500() {
    let server = start();
    let addr = server.local_addr();
    let error = tokio_tungstenite::connect_async(format!("ws://{addr}/ws/boom-before-accept"))
        .await
        .unwrap_err();
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 500),
        other => panic!("expected an HTTP 500, got {other}"),
    }
    assert_eq!(panics(&server, "websocket"), 1);
    tokio::task::spawn_blocking(move || wait_for_no_connections(&server))
        .await
        .unwrap();
}
