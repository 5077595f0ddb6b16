//! `tt-echo PORT`: a WebSocket echo server on tokio-tungstenite 0.27, written the way
//! its own `echo-server` example is: one task per connection, `split` and `forward`
//! the text and binary messages back. One thread (tokio's current_thread runtime), so
//! that it compares with `ringsocket serve --workers 1` on one pinned core.

use std::net::SocketAddr;

use futures_util::{StreamExt, TryStreamExt, future};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let addr = listen_addr();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            println!("tt-echo listening on ws://{}/", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(serve(stream));
            }
        })
}

async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (write, read) = ws.split();
    // Only data messages are echoed; Ping/Pong/Close are answered by tungstenite.
    let _ = read
        .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
        .forward(write)
        .await;
}

fn listen_addr() -> SocketAddr {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9002);
    SocketAddr::from(([127, 0, 0, 1], port))
}
