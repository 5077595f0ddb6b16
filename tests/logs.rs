//! What the library says in its logs, as a user who installed a `tracing` subscriber
//! (the README's one line) reads it: the mistakes a handler can make before the
//! upgrade and a handler's panic are named, never silent.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringsocket::app::App;

/// Log lines, shared with the subscriber's writer.
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

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The status line of the answer to an opening handshake for `path`.
fn handshake_status(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = match stream.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        };
        assert!(n > 0, "closed before a status line");
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn handler_mistakes_and_panics_are_logged_with_their_path() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let app = App::new()
        .websocket("/forgot", |_ws| async move {})
        .websocket("/early-recv", |ws| async move {
            let _ = ws.recv().await;
        })
        .websocket("/boom", |_ws| async move {
            panic!("the handler's own bug");
        });
    let server = common::start(app, |_| {});
    let addr = server.local_addr();
    assert!(handshake_status(addr, "/forgot").contains(" 403 "));
    assert!(handshake_status(addr, "/early-recv").contains(" 403 "));
    assert!(handshake_status(addr, "/boom").contains(" 500 "));
    let expected = [
        "path=\"/forgot\"",
        "returned without calling accept() or reject(): 403",
        "called recv() before accept()",
        "path=\"/early-recv\"",
        "panicked before accepting",
        "the handler's own bug",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = logs.text();
        if expected.iter().all(|line| text.contains(line)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "missing lines in the log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
