//! A core's topic registry: which of its sessions are in which topics.
//!
//! Two maps, kept in step: `topic → its subscribers on this core` (with the topic's
//! delivery state: a [`Fanout`] for a plain topic, a [`Conflation`] window for a
//! conflated one) and `session → its topics`, so that a session leaves every topic when
//! it ends. Each subscription also counts in the hub's process-wide directory (which
//! feeds `/metrics` and tells the broker which topics to listen to).
//!
//! Nothing here is shared with other cores: the registry lives in its core's thread-local
//! state (see `core`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;

use super::conflation::Conflation;
use super::fanout::{Fanout, Route};
use super::{Hub, MAX_TOPIC_LEN};
use crate::runtime::Session;

/// Topics one session may be subscribed to at once. Default 1,024.
pub const MAX_TOPICS_PER_SESSION: usize = 1024;

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The handshake has not been accepted yet (`accept` first).
    NotAccepted,
    /// The topic name is empty or too long.
    BadTopic,
    /// The session is in [`MAX_TOPICS_PER_SESSION`] topics already.
    TooManyTopics,
    /// Not on a worker of a running server whose app has rooms.
    NotRunning,
    /// The connection's grant (its JWT, or the `authorize` hook) does not allow this
    /// topic.
    NotAllowed,
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAccepted => f.write_str("accept the connection before subscribing"),
            Self::BadTopic => write!(f, "topic names are 1 to {MAX_TOPIC_LEN} bytes, without NUL"),
            Self::TooManyTopics => {
                write!(
                    f,
                    "a connection may be in at most {MAX_TOPICS_PER_SESSION} topics"
                )
            }
            Self::NotRunning => f.write_str("not on a worker of a running server"),
            Self::NotAllowed => f.write_str("topic not allowed"),
        }
    }
}

impl std::error::Error for SubscribeError {}

/// A session's key in this core's maps and in [`Delivery::exclude`](super::Delivery): the
/// id the runtime gives it, unique among the live sessions of its core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(usize);

impl SessionId {
    /// The id of `session`: the one place pubsub takes it from the runtime.
    pub(crate) fn of(session: &Session) -> Self {
        Self(session.id())
    }

    /// An id the runtime reported on its own (`Feed::take_closing`), as [`Self::of`]
    /// would give it.
    pub(super) fn reported(id: usize) -> Self {
        Self(id)
    }

    /// The id as bytes (for the default conflation key).
    pub(super) fn to_be_bytes(self) -> [u8; 8] {
        (self.0 as u64).to_be_bytes()
    }
}

/// One topic on one core.
pub(super) struct Topic {
    /// Every subscriber on this core, whatever its route.
    pub(super) subscribers: IndexMap<SessionId, Session>,
    /// How a publish reaches them.
    pub(super) mode: Mode,
}

/// How a topic's publishes reach its subscribers.
pub(super) enum Mode {
    /// Every publish goes out at once, through the topic's feed and direct copies.
    Plain(Fanout),
    /// The latest value per key goes out per window.
    Conflated(Conflation),
}

/// A core's topics and the topics of each of its sessions.
pub(super) struct Registry {
    /// The core's index, for the hub's per-core counts.
    core: usize,
    hub: Arc<Hub>,
    topics: HashMap<Arc<str>, Topic>,
    /// Session → its topics, to leave them all at teardown.
    sessions: HashMap<SessionId, Vec<Arc<str>>>,
}

impl Registry {
    pub(super) fn new(core: usize, hub: Arc<Hub>) -> Self {
        Self {
            core,
            hub,
            topics: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// The topic named `name`, if it has subscribers on this core.
    pub(super) fn topic_mut(&mut self, name: &str) -> Option<&mut Topic> {
        self.topics.get_mut(name)
    }

    /// The topics of session `id`.
    pub(super) fn topic_count(&self, id: SessionId) -> usize {
        self.sessions.get(&id).map_or(0, |topics| topics.len())
    }

    pub(super) fn topics_of(&self, id: SessionId) -> Vec<String> {
        self.sessions
            .get(&id)
            .map(|topics| topics.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default()
    }

    /// Subscribes `session` to `topic`. Returns whether the subscription is new and
    /// whether it is the session's first on this core (its teardown must then leave
    /// its topics).
    pub(super) fn subscribe(
        &mut self,
        session: &Session,
        topic: &str,
    ) -> Result<(bool, bool), SubscribeError> {
        let id = SessionId::of(session);
        let first = !self.sessions.contains_key(&id);
        let topics = self.sessions.entry(id).or_default();
        if topics.iter().any(|t| &**t == topic) {
            return Ok((false, first));
        }
        if topics.len() >= MAX_TOPICS_PER_SESSION {
            if topics.is_empty() {
                self.sessions.remove(&id);
            }
            return Err(SubscribeError::TooManyTopics);
        }
        let name = match self.topics.get_key_value(topic) {
            Some((name, _)) => name.clone(),
            None => {
                let name: Arc<str> = topic.into();
                let mode = match self.hub.conflation_window(super::public_name(topic)) {
                    Some(window) => Mode::Conflated(Conflation::new(window)),
                    None => Mode::Plain(Fanout::new()),
                };
                self.topics.insert(
                    name.clone(),
                    Topic {
                        subscribers: IndexMap::new(),
                        mode,
                    },
                );
                name
            }
        };
        // All of a session's plain topics share its route: if joining this one
        // changes it, the others change first.
        let route = Route::for_topic_count(topics.len() + 1);
        if route != Route::for_topic_count(topics.len()) {
            for other in topics.iter() {
                if let Some(Topic {
                    mode: Mode::Plain(fanout),
                    ..
                }) = self.topics.get_mut(other)
                {
                    fanout.reroute(id, session, route);
                }
            }
        }
        let Some(entry) = self.topics.get_mut(&name) else {
            return Err(SubscribeError::NotRunning);
        };
        entry.subscribers.insert(id, session.clone());
        if let Mode::Plain(fanout) = &mut entry.mode {
            fanout.join(id, session, route);
        }
        topics.push(name.clone());
        self.hub.directory_add(self.core, &name);
        Ok((true, first))
    }

    /// Unsubscribes session `id` from `topic`. Returns whether it was subscribed.
    pub(super) fn unsubscribe(&mut self, id: SessionId, topic: &str) -> bool {
        let Some(topics) = self.sessions.get_mut(&id) else {
            return false;
        };
        let Some(at) = topics.iter().position(|t| &**t == topic) else {
            return false;
        };
        topics.swap_remove(at);
        // If leaving changes the session's route, its other plain topics change
        // (before it leaves this one: nothing is published in between).
        let route = Route::for_topic_count(topics.len());
        if route != Route::for_topic_count(topics.len() + 1) {
            for other in topics.iter() {
                if let Some(Topic {
                    mode: Mode::Plain(fanout),
                    subscribers,
                }) = self.topics.get_mut(other)
                {
                    if let Some(session) = subscribers.get(&id) {
                        fanout.reroute(id, session, route);
                    }
                }
            }
        }
        self.leave(id, topic);
        true
    }

    /// Leaves every topic of a session that ended.
    pub(super) fn remove_session(&mut self, id: SessionId) {
        for topic in self.sessions.remove(&id).unwrap_or_default() {
            self.leave(id, &topic);
        }
    }

    /// Takes subscribers that can no longer be sent to (their connection is closing
    /// or has ended) out of `topic` right away, rather than when their close completes
    /// (up to the close timeout later): later publishes skip them. Their teardown then
    /// finds nothing left to do here.
    pub(super) fn leave_closing(&mut self, topic: &str, closing: Vec<SessionId>) {
        for id in closing {
            self.unsubscribe(id, topic);
        }
    }

    fn leave(&mut self, id: SessionId, topic: &str) {
        if let Some(entry) = self.topics.get_mut(topic) {
            let session = entry.subscribers.swap_remove(&id);
            match &mut entry.mode {
                Mode::Plain(fanout) => fanout.leave(id, session.as_ref()),
                Mode::Conflated(conflation) => conflation.forget(id),
            }
            if entry.subscribers.is_empty() {
                self.topics.remove(topic);
            }
        }
        self.hub.directory_remove(self.core, topic);
    }

    /// Whether `session` follows the feed of `topic` (tests).
    #[cfg(test)]
    pub(super) fn follows_feed(&self, session: &Session, topic: &str) -> bool {
        match self.topics.get(topic).map(|topic| &topic.mode) {
            Some(Mode::Plain(fanout)) => fanout.is_followed_by(session),
            _ => false,
        }
    }
}
