//! `tt-broadcast PORT`: a room server on tokio-tungstenite 0.27, written the naive way,
//! as its `server.rs` chat example is: a shared map of every connection's sender, and
//! for each message received a loop over the others, each getting a clone through an
//! unbounded channel to the task that writes to it. The URL's path names the room; a
//! message goes to every other connection on the same path (the sender excluded). One
//! thread (tokio's current_thread runtime), to compare with `ringsocket serve
//! --workers 1` on one pinned core.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Room (path) → connection → its outgoing queue.
type Rooms = Arc<Mutex<HashMap<String, HashMap<SocketAddr, UnboundedSender<Message>>>>>;

fn main() -> std::io::Result<()> {
    let addr = listen_addr();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            println!("tt-broadcast listening on ws://{}/ROOM", listener.local_addr()?);
            let rooms = Rooms::default();
            loop {
                let (stream, peer) = listener.accept().await?;
                tokio::spawn(serve(stream, peer, rooms.clone()));
            }
        })
}

async fn serve(stream: TcpStream, peer: SocketAddr, rooms: Rooms) {
    let _ = stream.set_nodelay(true);
    let mut room = String::new();
    let callback = |req: &Request, resp: Response| {
        room = req.uri().path().to_owned();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    let (tx, mut rx) = unbounded_channel();
    lock(&rooms).entry(room.clone()).or_default().insert(peer, tx);
    let (mut write, mut read) = ws.split();

    let broadcast = async {
        while let Some(Ok(msg)) = read.next().await {
            if !(msg.is_text() || msg.is_binary()) {
                continue; // Ping/Pong/Close are answered by tungstenite.
            }
            let rooms = lock(&rooms);
            if let Some(members) = rooms.get(&room) {
                for (addr, member) in members {
                    if *addr != peer {
                        let _ = member.send(msg.clone());
                    }
                }
            }
        }
    };
    let forward = async {
        // As `StreamExt::forward` does: feed what is queued, flush when nothing is.
        while let Some(msg) = rx.recv().await {
            if write.feed(msg).await.is_err() {
                return;
            }
            while let Ok(msg) = rx.try_recv() {
                if write.feed(msg).await.is_err() {
                    return;
                }
            }
            if write.flush().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = broadcast => {}
        () = forward => {}
    }
    let mut rooms = lock(&rooms);
    if let Some(members) = rooms.get_mut(&room) {
        members.remove(&peer);
        if members.is_empty() {
            rooms.remove(&room);
        }
    }
}

fn lock(rooms: &Rooms) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<SocketAddr, UnboundedSender<Message>>>> {
    rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn listen_addr() -> SocketAddr {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or(9005);
    SocketAddr::from(([127, 0, 0, 1], port))
}
