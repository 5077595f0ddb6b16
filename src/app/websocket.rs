//! The WebSocket handle a route's handler receives, FastAPI style:
//! `accept`, `recv`, `send`, `close`, and a [`Disconnect`] that says how it ended.

use std::net::SocketAddr;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use super::access::{Access, Grant};
use crate::metrics::Rejection;

use crate::proto::handshake::Request;
use crate::proto::{CloseCode, Message, Utf8Bytes};
use crate::pubsub::{self, PublishError, SubscribeError};
use crate::runtime::{Disconnect, Response, Session};
use crate::tasks::BackgroundTasks;

/// A WebSocket connection on its way in (before `accept`) and after.
#[derive(Debug, Clone)]
pub struct WebSocket {
    session: Session,
    params: Vec<(String, String)>,
    tasks: BackgroundTasks,
    /// The server's topic rules.
    access: Arc<Access>,
    /// What the client was granted (its JWT, the connect hooks); `None` when no such
    /// rule is configured: every topic is open.
    grants: Option<Rc<[Grant]>>,
}

impl WebSocket {
    pub(crate) fn new(
        session: Session,
        params: Vec<(String, String)>,
        tasks: BackgroundTasks,
        access: Arc<Access>,
        grants: Option<Rc<[Grant]>>,
    ) -> Self {
        Self {
            session,
            params,
            tasks,
            access,
            grants,
        }
    }

    /// The client's id: the `sub` of its JWT or of the connect hook's grant.
    pub fn sub(&self) -> Option<&str> {
        self.grants
            .as_deref()?
            .iter()
            .find_map(|g| g.sub.as_deref())
    }

    /// What the client was granted, when JWTs or connect hooks are configured.
    pub fn grants(&self) -> &[Grant] {
        self.grants.as_deref().unwrap_or_default()
    }

    /// Whether this connection may subscribe to `topic`: a valid name, allowed by its
    /// grants. Call it before [`accept`](Self::accept) to refuse the handshake (400
    /// for a bad name, 403 for a topic not allowed), as the default app's rooms do.
    pub fn may_subscribe(&self, topic: &str) -> Result<(), SubscribeError> {
        if let Err(why) = self.access.check_topic_name(topic) {
            self.access.rejected(Rejection::TopicName);
            tracing::debug!(peer = %self.peer(), why, "bad topic name");
            return Err(SubscribeError::BadTopic);
        }
        if !self.grants().iter().all(|g| g.topics.allows(topic)) {
            self.access.rejected(Rejection::Topic);
            tracing::debug!(peer = %self.peer(), sub = self.sub().unwrap_or_default(), topic, "topic not allowed");
            return Err(SubscribeError::NotAllowed);
        }
        Ok(())
    }

    /// What is wrong with `topic` as a name, if anything (the server's length limit
    /// and character set).
    pub fn topic_name_error(&self, topic: &str) -> Option<String> {
        self.access.check_topic_name(topic).err()
    }

    /// Whether this connection may publish to `topic` from its socket.
    pub fn may_publish(&self, topic: &str) -> Result<(), PublishError> {
        if self.access.check_topic_name(topic).is_err() {
            self.access.rejected(Rejection::TopicName);
            return Err(PublishError::BadTopic);
        }
        if !self.grants().iter().all(|g| g.publish.allows(topic)) {
            self.access.rejected(Rejection::PublishNotAllowed);
            tracing::debug!(peer = %self.peer(), sub = self.sub().unwrap_or_default(), topic, "not allowed to publish");
            return Err(PublishError::NotAllowed);
        }
        Ok(())
    }

    /// The session under this handle (the pubsub layer's entry points take it).
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// Counts a refusal in `ringsocket_rejections_total`.
    pub(crate) fn rejected(&self, why: Rejection) {
        self.access.rejected(why);
    }

    /// `max_topics_per_connection`.
    pub(crate) fn max_topics(&self) -> usize {
        self.access.max_topics()
    }

    /// Background jobs for this connection; they start at once on the executor.
    pub fn tasks(&self) -> &BackgroundTasks {
        &self.tasks
    }

    /// The path parameter `name`, converted to `T`. Parameters declared with a type in
    /// the route (`{id:u64}`) were checked before the handler ran.
    pub fn param<T: FromStr>(&self, name: &str) -> Option<T> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.parse().ok())
    }

    /// Every path parameter, in order.
    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    /// The upgrade request: path, query, headers.
    pub fn request(&self) -> &Request {
        self.session.request()
    }

    /// The query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.session.request().query()
    }

    /// The client's address: the TCP peer, or the source of its PROXY protocol header
    /// (`proxy_protocol`), or what a trusted proxy's `Forwarded` / `X-Forwarded-For`
    /// names (`trusted_proxies`; port 0 when the header gives none).
    pub fn peer(&self) -> SocketAddr {
        self.session.peer()
    }

    /// Accepts the connection (answers 101).
    pub fn accept(&self) {
        self.session.accept(None);
    }

    /// Accepts with the first of `supported` that the client offered, and returns it
    /// (RFC 6455 §4.2.2: the server's preference order).
    pub fn accept_protocol<'a>(&self, supported: &[&'a str]) -> Option<&'a str> {
        let chosen = self.session.request().select_protocol(supported);
        self.session.accept(chosen);
        chosen
    }

    /// Refuses the connection with `status` and a one-line reason, before the upgrade.
    pub fn reject(&self, status: u16, reason: &str) {
        self.session.reject(Response::error(status, reason));
    }

    /// The next message, or how the connection ended.
    pub async fn recv(&self) -> Result<Message, Disconnect> {
        self.session.recv().await
    }

    /// Queues a message; it is written in the connection's next batched write.
    pub fn send(&self, message: Message) -> Result<(), Disconnect> {
        self.session.send(message)
    }

    /// Queues a text message.
    pub fn send_text(&self, text: impl Into<Utf8Bytes>) -> Result<(), Disconnect> {
        self.session.send_text(text)
    }

    /// Queues a binary message.
    pub fn send_binary(&self, bytes: impl Into<Bytes>) -> Result<(), Disconnect> {
        self.session.send_binary(bytes)
    }

    /// Starts the closing handshake with `code` and `reason`.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.session.close(code, reason);
    }

    /// Joins `topic`: from now on this connection receives what is published to it,
    /// from any core or process, in publish order. Only after `accept`. Returns
    /// whether it was not subscribed already. Topics are left when the connection ends.
    ///
    /// Refused with [`SubscribeError::BadTopic`] for a name outside the server's rules
    /// (`max_topic_length`, letters, digits and `_-.:@/=+~,!$`),
    /// [`SubscribeError::NotAllowed`] when the client's grants do not allow it and
    /// [`SubscribeError::TooManyTopics`] beyond `max_topics_per_connection`; each is
    /// counted in `ringsocket_rejections_total`.
    pub fn subscribe(&self, topic: &str) -> Result<bool, SubscribeError> {
        self.may_subscribe(topic)?;
        if pubsub::topic_count(&self.session) >= self.access.max_topics()
            && !pubsub::topics_of(&self.session).iter().any(|t| t == topic)
        {
            self.access.rejected(Rejection::TopicsPerConnection);
            tracing::debug!(peer = %self.peer(), limit = self.access.max_topics(), "max_topics_per_connection reached");
            return Err(SubscribeError::TooManyTopics);
        }
        pubsub::subscribe(&self.session, topic)
    }

    /// Leaves `topic`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, topic: &str) -> bool {
        pubsub::unsubscribe(&self.session, topic)
    }

    /// The topics this connection is subscribed to.
    pub fn topics(&self) -> Vec<String> {
        pubsub::topics_of(&self.session)
    }

    /// Publishes `message` to every subscriber of `topic` in every process, this
    /// connection included if it is one. The frame is encoded once for all of them.
    /// Refused with [`PublishError::NotAllowed`] when the client's grants do not allow
    /// the topic.
    pub fn publish(&self, topic: &str, message: Message) -> Result<(), PublishError> {
        self.may_publish(topic)?;
        pubsub::publish_from_session(&self.session, topic, &message, None, true)
    }

    /// Publishes to every subscriber of `topic` but this connection.
    pub fn publish_to_others(&self, topic: &str, message: Message) -> Result<(), PublishError> {
        self.may_publish(topic)?;
        pubsub::publish_from_session(&self.session, topic, &message, None, false)
    }

    /// Publishes with a conflation key: on a conflated topic, only the latest message
    /// per key reaches each subscriber within the window (see [`crate::pubsub`]).
    /// Without a key, a connection's publishes conflate per connection.
    pub fn publish_keyed(
        &self,
        topic: &str,
        key: impl Into<Bytes>,
        message: Message,
        include_self: bool,
    ) -> Result<(), PublishError> {
        self.may_publish(topic)?;
        pubsub::publish_from_session(
            &self.session,
            topic,
            &message,
            Some(key.into()),
            include_self,
        )
    }
}
