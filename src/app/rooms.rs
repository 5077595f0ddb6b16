//! The rooms of the default app (`ringsocket serve`): `/ws/{room}`, `/broadcast` and
//! `POST /publish/{topic}`, so that browsers join rooms and any backend (FastAPI,
//! Django, a cron job) publishes to them over HTTP.

use bytes::Bytes;

use super::access::Access;
use super::{App, Request, WebSocket};
use crate::metrics::Rejection;
use crate::proto::{CloseCode, Message, Utf8Bytes};
use crate::pubsub::{Hub, PublishError, Publisher, SubscribeError};
use crate::runtime::Response;

/// The room `/broadcast` relays to: the one the load generators use.
pub const BROADCAST_ROOM: &str = "broadcast";

impl App {
    /// The default app of `ringsocket serve`:
    /// - `/echo`: every message comes back;
    /// - `/ws/{room}`: every message a client sends goes to everyone else in the room;
    /// - `/broadcast`: the same, for the one room [`BROADCAST_ROOM`];
    /// - `POST /publish/{topic}`: the body goes to every subscriber of the topic, as a
    ///   text message unless `Content-Type` is `application/octet-stream`; 202, or 503
    ///   with `Retry-After: 1` when the broker's backlog is full (delivered to no one).
    /// - `/v1`: the `ringsocket.v1` protocol (docs/protocol.md), with recovery;
    /// - `GET /history/{topic}?since=N&limit=M`: a topic's kept publications, guarded
    ///   like the publish API;
    /// - `GET /`: the demo page (a chat room and live cursors), and
    ///   `GET /ringsocket.js`: the JavaScript client it uses.
    pub fn standard() -> Self {
        let app = Self::echo()
            .websocket("/ws/{room}", |ws| async move {
                let room = ws.param::<String>("room").unwrap_or_default();
                relay(ws, &room).await;
            })
            .websocket("/broadcast", |ws| relay(ws, BROADCAST_ROOM))
            .websocket("/v1", super::v1::serve)
            .get("/", |_| async {
                page(DEMO_PAGE, "text/html; charset=utf-8")
            })
            .get("/ringsocket.js", |_| async {
                page(JS_CLIENT, "text/javascript; charset=utf-8")
            });
        let hub = app.hub.clone();
        let access = app.access.clone();
        let app = app.get("/history/{topic}", move |req| {
            let hub = hub.clone();
            let access = access.get().cloned().unwrap_or_default();
            async move {
                match access.check_publish(req.head(), req.peer()) {
                    Ok(()) => history(&hub, &access, &req).await,
                    Err(refused) => refused,
                }
            }
        });
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
/// 1008 "not allowed to publish". A message refused because the broker's backlog is
/// full ([`PublishError::Unavailable`]) is dropped for everyone (counted in
/// `ringsocket_broker_backlog_full_total`) and the connection stays open.
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
            if e == PublishError::Unavailable {
                // The broker's backlog is full: the server's trouble, not the client's.
                // The message went to no one; the broker counted and logged it. Closing
                // would not help (the backlog drains when Redis is back) and would have
                // the whole room reconnect at once.
                continue;
            }
            tracing::warn!(room, error = %e, "publish failed");
            ws.close(CloseCode::Again, &e.to_string());
            break;
        }
    }
}

/// The demo page, embedded at build time.
const DEMO_PAGE: &str = include_str!("../../clients/demo/index.html");

/// The JavaScript client (clients/js), embedded at build time.
const JS_CLIENT: &str = include_str!("../../clients/js/ringsocket.js");

/// An embedded file, revalidated by its length (it changes only with the binary).
fn page(body: &'static str, content_type: &str) -> Response {
    let mut response = Response::text(200, body);
    response.content_type = content_type.to_owned();
    response
        .with_header("Cache-Control", "no-cache")
        .with_header("X-Content-Type-Options", "nosniff")
}

/// `GET /history/{topic}?since=N&limit=M`: 200 with the topic's position and its kept
/// publications after `since` (docs/protocol.md).
async fn history(hub: &Hub, access: &Access, req: &Request) -> Response {
    let Some(topic) = req.param::<String>("topic") else {
        return Response::error(400, "missing topic");
    };
    if let Err(why) = access.check_topic_name(&topic) {
        access.rejected(Rejection::TopicName);
        return Response::error(400, &why);
    }
    let max = hub.history_settings().size;
    let mut since = 0u64;
    let mut limit = max;
    for (name, value) in query_pairs(req.head().query().unwrap_or_default()) {
        let bad =
            |what: &str| Response::error(400, &format!("{name} must be {what}, got {value:?}"));
        match name {
            "since" => match value.parse() {
                Ok(n) => since = n,
                Err(_) => return bad("a whole number"),
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) => limit = n.min(max),
                Err(_) => return bad("a whole number"),
            },
            _ => {}
        }
    }
    let unavailable = || {
        Response::error(
            503,
            "the history is at Redis, which does not answer now; retry later",
        )
        .with_header("Retry-After", "1")
    };
    let page = match hub.broker_history(&topic, since, limit) {
        None => hub.history_page(&topic, since, limit),
        // The history is at the broker (Redis): asked there, off this core.
        Some(answer) => match tokio::time::timeout(std::time::Duration::from_secs(2), answer).await
        {
            Ok(Ok(Ok(snapshot))) => hub.history_page_of(&topic, &snapshot, since),
            Ok(Ok(Err(e))) => {
                tracing::debug!(topic, error = %e, "GET /history: the broker's history could not be read");
                return unavailable();
            }
            _ => return unavailable(),
        },
    };
    let mut body =
        String::with_capacity(96 + page.publications.iter().map(Bytes::len).sum::<usize>());
    body.push_str(r#"{"topic":"#);
    body.push_str(&serde_json::to_string(&topic).unwrap_or_default());
    body.push_str(r#","epoch":"#);
    let (epoch, offset) = match &page.position {
        Some(p) => (
            serde_json::to_string(&*p.epoch).unwrap_or_default(),
            p.offset,
        ),
        None => ("null".to_owned(), 0),
    };
    body.push_str(&epoch);
    body.push_str(&format!(
        r#","offset":{offset},"recovered":{},"publications":["#,
        page.recovered
    ));
    for (i, publication) in page.publications.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        // Made here from JSON: always UTF-8.
        body.push_str(std::str::from_utf8(publication).unwrap_or("null"));
    }
    body.push_str("]}\n");
    Response::json(200, body)
}

/// `a=1&b=2` as pairs (no percent-decoding: the values read here are numbers).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
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
        Err(e @ PublishError::Unavailable) => {
            Response::error(503, &e.to_string()).with_header("Retry-After", "1")
        }
        Err(e) => Response::error(503, &e.to_string()),
    }
}
