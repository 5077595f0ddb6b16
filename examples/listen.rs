//! A WebSocket client for a first try: joins a room of `ringsocket serve`, prints every
//! message that arrives, and sends each line typed on stdin.
//!
//! ```text
//! cargo run --release -- serve                       # terminal 1: the server
//! cargo run --example listen                         # terminal 2: joins ws://127.0.0.1:9001/ws/lobby
//! curl -d 'hello' http://127.0.0.1:9001/publish/lobby  # terminal 3: terminal 2 prints "hello"
//! cargo run --example listen -- ws://127.0.0.1:9001/echo   # any other WebSocket URL
//! ```
//!
//! It uses `tokio-tungstenite`, an independent client, so what it shows is what any
//! client gets.
#![allow(clippy::unwrap_used)]

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:9001/ws/lobby".to_owned());
    let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| format!("cannot connect to {url}: {e} (is `ringsocket serve` running?)"))?;
    eprintln!("connected to {url}; type a line to send it, Ctrl-D to close");
    let (mut tx, mut rx) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut typing = true;
    loop {
        tokio::select! {
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Text(text))) => println!("{text}"),
                Some(Ok(Message::Binary(bytes))) => println!("<{} binary bytes>", bytes.len()),
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("closed by the server: {frame:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            line = lines.next_line(), if typing => match line? {
                Some(line) => tx.send(Message::text(line)).await?,
                None => {
                    typing = false;
                    tx.send(Message::Close(None)).await?;
                }
            },
        }
    }
}
