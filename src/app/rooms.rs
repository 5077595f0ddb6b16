//! The rooms of the default app (`ringsocket serve`): `/ws/{room}`, `/broadcast` and
//! `POST /publish/{topic}`, so that browsers join rooms and any backend (FastAPI,
//! Django, a cron job) publishes to them over HTTP.

use bytes::Bytes;

use super::access::Access;
use super::{App, Request, WebSocket};
use crate::metrics::Rejection;
use crate::proto::{CloseCode, Message, Utf8Bytes};
use crate::pubsub::{PublishError, Publisher, SubscribeError};
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
        let access = app.access.clone();
        let mut app = app.post("/publish/{topic}", move |req| {
            let publisher = publisher.clone();
            let access = access.get().cloned().unwrap_or_default();
            async move {
                match access.check_publish(req.head(), req.peer()) {
                    Ok(()) => publish(&publisher, &access, &req),
                    Err(refused) => refused,
                }
            }
        });
        app.publish_api = true;
        app
    }
}

/// Joins `room` and sends every message received to everyone else in it. A room the
/// client may not join is refused before the upgrade: 400 for a bad name, 403 for a
/// topic its grants do not allow. A message it may not publish there closes it with
/// 1008 "not allowed to publish".
pub async fn relay(ws: WebSocket, room: &str) {
    match ws.may_subscribe(room) {
        Ok(()) => {}
        Err(e @ SubscribeError::BadTopic) => {
            let why = ws.topic_name_error(room).unwrap_or_else(|| e.to_string());
            return ws.reject(400, &why);
        }
        Err(e) => return ws.reject(403, &e.to_string()),
    }
    ws.accept();
    if let Err(e) = ws.subscribe(room) {
        tracing::info!(peer = %ws.peer(), room, error = %e, "cannot join room");
        ws.close(CloseCode::Policy, &e.to_string());
        return;
    }
    while let Ok(message) = ws.recv().await {
        if let Err(e) = ws.publish_to_others(room, message) {
            if e == PublishError::NotAllowed {
                ws.close(CloseCode::Policy, "not allowed to publish");
                break;
            }
            tracing::warn!(room, error = %e, "publish failed");
            ws.close(CloseCode::Again, &e.to_string());
            break;
        }
    }
}

/// `POST /publish/{topic}`.
fn publish(publisher: &Publisher, access: &Access, req: &Request) -> Response {
    let Some(topic) = req.param::<String>("topic") else {
        return Response::error(400, "missing topic");
    };
    if let Err(why) = access.check_topic_name(&topic) {
        access.rejected(Rejection::TopicName);
        return Response::error(400, &why);
    }
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
