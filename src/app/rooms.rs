//! The rooms of the default app (`ringsocket serve`): `/ws/{room}`, `/broadcast` and
//! `POST /publish/{topic}`, so that browsers join rooms and any backend (FastAPI,
//! Django, a cron job) publishes to them over HTTP.

use bytes::Bytes;

use super::{App, Request, WebSocket};
use crate::proto::{CloseCode, Message, Utf8Bytes};
use crate::pubsub::{PublishError, Publisher};
use crate::runtime::Response;

/// The room `/broadcast` relays to: the one the load generators use.
pub const BROADCAST_ROOM: &str = "broadcast";

impl App {
    /// The default app of `ringsocket serve`:
    /// - `/echo`: every message comes back;
    /// - `/ws/{room}`: every message a client sends goes to everyone else in the room;
    /// - `/broadcast`: the same, for the one room [`BROADCAST_ROOM`];
    /// - `POST /publish/{topic}`: the body goes to every subscriber of the topic, as a
    ///   text message unless `Content-Type` is `application/octet-stream`; 202.
    pub fn standard() -> Self {
        let app = Self::echo()
            .websocket("/ws/{room}", |ws| async move {
                let room = ws.param::<String>("room").unwrap_or_default();
                relay(ws, &room).await;
            })
            .websocket("/broadcast", |ws| relay(ws, BROADCAST_ROOM));
        let publisher = app.publisher();
        app.post("/publish/{topic}", move |req| {
            let publisher = publisher.clone();
            async move { publish(&publisher, &req) }
        })
    }
}

/// Joins `room` and sends every message received to everyone else in it.
pub async fn relay(ws: WebSocket, room: &str) {
    ws.accept();
    if let Err(e) = ws.subscribe(room) {
        tracing::info!(peer = %ws.peer(), room, error = %e, "cannot join room");
        ws.close(CloseCode::Policy, &e.to_string());
        return;
    }
    while let Ok(message) = ws.recv().await {
        if let Err(e) = ws.publish_to_others(room, message) {
            tracing::warn!(room, error = %e, "publish failed");
            ws.close(CloseCode::Again, &e.to_string());
            break;
        }
    }
}

/// `POST /publish/{topic}`.
fn publish(publisher: &Publisher, req: &Request) -> Response {
    let Some(topic) = req.param::<String>("topic") else {
        return Response::error(400, "missing topic");
    };
    let binary = req
        .head()
        .header_str("content-type")
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/octet-stream"));
    let message = if binary {
        Message::Binary(req.body().clone())
    } else {
        match Utf8Bytes::try_from(Bytes::clone(req.body())) {
            Ok(text) => Message::Text(text),
            Err(_) => {
                return Response::error(
                    400,
                    "the body is not valid UTF-8; send Content-Type: application/octet-stream for binary",
                );
            }
        }
    };
    match publisher.publish(&topic, message) {
        Ok(()) => Response::text(202, "accepted\n"),
        Err(e @ PublishError::BadTopic) => Response::error(400, &e.to_string()),
        Err(e) => Response::error(503, &e.to_string()),
    }
}
