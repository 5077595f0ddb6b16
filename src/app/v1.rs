//! The `ringsocket.v1` protocol (docs/protocol.md) on `/v1`: many topics on one
//! connection, acknowledged publishes, offsets, epochs and recovery.
//!
//! One request frame in, its reply (and for a subscription, the recovered publications)
//! out; publications reach the connection through the pubsub layer like any other
//! subscriber's, encoded once per publish. Nothing a client sends closes its connection
//! here: a bad request is answered with an error frame naming the cause.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::WebSocket;
use crate::metrics::Rejection;
use crate::proto::{Message, Utf8Bytes};
use crate::pubsub::{self, Position, PublishError, Since, SubscribeError, V1Ack, V1Subscribed};

/// The subprotocol a client must offer on `/v1`.
pub const PROTOCOL: &str = "ringsocket.v1";

/// Longest wait for a numbering broker's history on a subscription, after which it
/// goes by what this process has.
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A request frame. Unknown fields are ignored (a later minor version may add some).
#[derive(Deserialize)]
struct Request<'a> {
    id: Option<u64>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default)]
    since: Option<SinceField>,
    /// Any JSON value, `null` included (absent is `None`).
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    key: Option<Cow<'a, str>>,
}

/// A field that is there, whatever its value (`null` too).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct SinceField {
    offset: u64,
    epoch: String,
}

/// An error reply's code (docs/protocol.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    BadRequest,
    BadTopic,
    NotAllowed,
    TooManyTopics,
    NotSubscribed,
    Unavailable,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::BadTopic => "bad_topic",
            Self::NotAllowed => "not_allowed",
            Self::TooManyTopics => "too_many_topics",
            Self::NotSubscribed => "not_subscribed",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Serves one `/v1` connection. Refuses (400) a client that does not offer
/// [`PROTOCOL`].
pub async fn serve(ws: WebSocket) {
    if ws.request().select_protocol(&[PROTOCOL]).is_none() {
        return ws.reject(
            400,
            "offer Sec-WebSocket-Protocol: ringsocket.v1 (docs/protocol.md)",
        );
    }
    ws.accept_protocol(&[PROTOCOL]);
    while let Ok(message) = ws.recv().await {
        let reply = match &message {
            Message::Text(text) => handle(&ws, text).await,
            Message::Binary(_) => Some(error(
                None,
                Code::BadRequest,
                "ringsocket.v1 frames are text frames holding one JSON object",
            )),
        };
        if let Some(reply) = reply {
            if ws.send_text(reply).is_err() {
                break;
            }
        }
    }
}

/// Answers one request frame; `None` when the reply was queued already (a
/// subscription's, ahead of its recovered publications).
async fn handle(ws: &WebSocket, text: &Utf8Bytes) -> Option<String> {
    let request: Request<'_> = match serde_json::from_str(text.as_str()) {
        Ok(request) => request,
        Err(e) => {
            // The id, if that much can be read, so the client can match the error.
            #[derive(Deserialize)]
            struct IdOnly {
                id: Option<u64>,
            }
            let id = serde_json::from_str::<IdOnly>(text.as_str())
                .ok()
                .and_then(|r| r.id);
            return Some(error(
                id,
                Code::BadRequest,
                &format!("not a ringsocket.v1 request: {e}"),
            ));
        }
    };
    let id = request.id;
    let kind = &*request.kind;
    let topic = request.topic.as_deref();
    if matches!(kind, "subscribe" | "unsubscribe" | "publish") && topic.is_none() {
        return Some(error(
            id,
            Code::BadRequest,
            &format!("{kind} needs a topic"),
        ));
    }
    let topic = topic.unwrap_or_default();
    match kind {
        "subscribe" => {
            let since = request.since.map(|s| Since {
                offset: s.offset,
                epoch: s.epoch,
            });
            subscribe(ws, id, topic, since.as_ref()).await
        }
        "unsubscribe" => Some(if pubsub::unsubscribe_v1(ws.session(), topic) {
            let mut reply = head(id, "unsubscribed");
            field(&mut reply, "topic", topic);
            close(reply)
        } else {
            error(
                id,
                Code::NotSubscribed,
                &format!("not subscribed to {topic}"),
            )
        }),
        "publish" => {
            let Some(data) = request.data else {
                return Some(error(id, Code::BadRequest, "publish needs data"));
            };
            publish(ws, id, topic, data.get(), request.key.as_deref())
        }
        "ping" => Some(close(head(id, "pong"))),
        other => Some(error(
            id,
            Code::BadRequest,
            &format!("unknown type {other:?} (subscribe, unsubscribe, publish or ping)"),
        )),
    }
}

async fn subscribe(
    ws: &WebSocket,
    id: Option<u64>,
    topic: &str,
    since: Option<&Since>,
) -> Option<String> {
    if let Err(e) = ws.may_subscribe(topic) {
        return Some(subscribe_error(ws, id, topic, &e));
    }
    let session = ws.session();
    if pubsub::topic_count(session) >= ws.max_topics()
        && !pubsub::topics_of(session).iter().any(|t| t == topic)
    {
        ws.rejected(Rejection::TopicsPerConnection);
        return Some(subscribe_error(
            ws,
            id,
            topic,
            &SubscribeError::TooManyTopics,
        ));
    }
    // With a numbering broker (Redis history), what it holds: any process recovers.
    let snapshot = match pubsub::v1_snapshot(topic, since.map_or(0, |s| s.offset)) {
        None => None,
        Some(answer) => match tokio::time::timeout(SNAPSHOT_TIMEOUT, answer).await {
            Ok(Ok(Ok(snapshot))) => Some(snapshot),
            Ok(Ok(Err(e))) => {
                tracing::debug!(topic, error = %e, "ringsocket.v1 subscribe: the broker's history could not be read; going by this process's");
                None
            }
            _ => {
                tracing::debug!(
                    topic,
                    "ringsocket.v1 subscribe: no answer from the broker's history; going by this process's"
                );
                None
            }
        },
    };
    let result = pubsub::subscribe_v1(ws.session(), topic, since, snapshot.as_ref(), |s| {
        Message::Text(subscribed(id, topic, s).into())
    });
    match result {
        Ok(_) => None,
        Err(e) => {
            if e == SubscribeError::TooManyTopics {
                ws.rejected(Rejection::TopicsPerConnection);
            }
            Some(subscribe_error(ws, id, topic, &e))
        }
    }
}

fn subscribe_error(ws: &WebSocket, id: Option<u64>, topic: &str, e: &SubscribeError) -> String {
    match e {
        SubscribeError::BadTopic => {
            let why = ws.topic_name_error(topic).unwrap_or_else(|| e.to_string());
            error(id, Code::BadTopic, &why)
        }
        SubscribeError::NotAllowed => error(
            id,
            Code::NotAllowed,
            &format!("not allowed to subscribe to {topic}"),
        ),
        SubscribeError::TooManyTopics => error(
            id,
            Code::TooManyTopics,
            &format!(
                "a connection may be in at most {} topics (max_topics_per_connection)",
                ws.max_topics()
            ),
        ),
        SubscribeError::NotAccepted | SubscribeError::NotRunning => {
            error(id, Code::Unavailable, &e.to_string())
        }
    }
}

fn publish(
    ws: &WebSocket,
    id: Option<u64>,
    topic: &str,
    data: &str,
    key: Option<&str>,
) -> Option<String> {
    if let Err(e) = ws.may_publish(topic) {
        return Some(publish_error(ws, id, topic, &e));
    }
    let key = key.map(|k| Bytes::copy_from_slice(k.as_bytes()));
    match pubsub::publish_v1(ws.session(), topic, data, key) {
        Ok(V1Ack::Now(position)) => Some(published(id, topic, Some(&position))),
        Ok(V1Ack::Later(answer)) => {
            // Acknowledged when the broker has numbered it; other requests go on.
            let ws = ws.clone();
            let topic = topic.to_owned();
            tokio::task::spawn_local(async move {
                let position = answer
                    .await
                    .ok()
                    .flatten()
                    .map(|(offset, epoch)| Position { offset, epoch });
                let _ = ws.send_text(published(id, &topic, position.as_ref()));
            });
            None
        }
        Err(e) => Some(publish_error(ws, id, topic, &e)),
    }
}

fn publish_error(ws: &WebSocket, id: Option<u64>, topic: &str, e: &PublishError) -> String {
    match e {
        PublishError::BadTopic => {
            let why = ws.topic_name_error(topic).unwrap_or_else(|| e.to_string());
            error(id, Code::BadTopic, &why)
        }
        PublishError::NotAllowed => error(
            id,
            Code::NotAllowed,
            &format!("not allowed to publish to {topic}"),
        ),
        // Counted and logged (at most once a second) by the broker.
        PublishError::Unavailable => error(id, Code::Unavailable, &e.to_string()),
        _ => {
            tracing::warn!(topic, error = %e, "ringsocket.v1 publish refused");
            error(id, Code::Unavailable, &e.to_string())
        }
    }
}

/// `{"id":…,"type":"subscribed",…}`.
fn subscribed(id: Option<u64>, topic: &str, s: &V1Subscribed) -> String {
    let mut reply = head(id, "subscribed");
    field(&mut reply, "topic", topic);
    position(&mut reply, &s.position);
    reply.push_str(&format!(
        ",\"recovered\":{},\"missed\":{},\"conflated\":{}",
        s.recovered, s.missed, s.conflated
    ));
    close(reply)
}

/// `{"id":…,"type":"published","topic":…,"offset":…,"epoch":…}` (offset and epoch
/// `null` in the rare case a numbering broker cannot say: a publication sent again
/// after a broken connection).
fn published(id: Option<u64>, topic: &str, p: Option<&Position>) -> String {
    let mut reply = head(id, "published");
    field(&mut reply, "topic", topic);
    match p {
        Some(p) => position(&mut reply, p),
        None => reply.push_str(r#","offset":null,"epoch":null"#),
    }
    close(reply)
}

/// `{"id":…,"type":"error","code":…,"message":…}`.
fn error(id: Option<u64>, code: Code, message: &str) -> String {
    let mut reply = head(id, "error");
    field(&mut reply, "code", code.as_str());
    field(&mut reply, "message", message);
    close(reply)
}

/// The start of a reply object: its id (when the request had one) and type.
fn head(id: Option<u64>, kind: &str) -> String {
    match id {
        Some(id) => format!("{{\"id\":{id},\"type\":\"{kind}\""),
        None => format!("{{\"type\":\"{kind}\""),
    }
}

fn field(reply: &mut String, name: &str, value: &str) {
    reply.push_str(",\"");
    reply.push_str(name);
    reply.push_str("\":");
    // Serializing a `str` cannot fail.
    reply.push_str(&serde_json::to_string(value).unwrap_or_default());
}

fn position(reply: &mut String, p: &Position) {
    reply.push_str(&format!(",\"offset\":{}", p.offset));
    field(reply, "epoch", &p.epoch);
}

fn close(mut reply: String) -> String {
    reply.push('}');
    reply
}
