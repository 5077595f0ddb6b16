//! `fws-echo PORT`: a WebSocket echo server on fastwebsockets 0.10 with hyper's upgrade,
//! written the way its own `echo_server` example is: hyper serves HTTP/1.1,
//! `fastwebsockets::upgrade::upgrade` answers the handshake, and a `FragmentCollector`
//! reads whole messages that are written straight back. One thread (tokio's
//! current_thread runtime), to compare with `ringsocket serve --workers 1`.

use std::net::SocketAddr;

use fastwebsockets::{FragmentCollector, OpCode, WebSocketError, upgrade};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() -> std::io::Result<()> {
    let addr = listen_addr();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            println!("fws-echo listening on ws://{}/", listener.local_addr()?);
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let conn = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(server_upgrade))
                        .with_upgrades();
                    let _ = conn.await;
                });
            }
        })
}

async fn server_upgrade(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let _ = handle_client(fut).await;
    });
    Ok(response)
}

async fn handle_client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    // auto_pong and auto_close are on by default: control frames are answered for us.
    let mut ws = FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

fn listen_addr() -> SocketAddr {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9003);
    SocketAddr::from(([127, 0, 0, 1], port))
}
