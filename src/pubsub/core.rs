//! One core's side of pubsub: its topic registry, its inbox task, conflation windows.
//!
//! The state lives in a thread-local, because a core is a thread (one pinned worker)
//! and everything here is `!Send` (sessions). Nothing in it is shared with other cores.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Delivery, Hub, PublishError, encode_message, valid_topic};
use crate::proto::Message;
use crate::runtime::Session;

/// Topics one session may be subscribed to at once. Default 1,024.
pub const MAX_TOPICS_PER_SESSION: usize = 1024;

thread_local! {
    static CORE: RefCell<Option<Core>> = const { RefCell::new(None) };
}

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
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAccepted => f.write_str("accept the connection before subscribing"),
            Self::BadTopic => write!(f, "topic names are 1 to {} bytes", super::MAX_TOPIC_LEN),
            Self::TooManyTopics => {
                write!(
                    f,
                    "a connection may be in at most {MAX_TOPICS_PER_SESSION} topics"
                )
            }
            Self::NotRunning => f.write_str("not on a worker of a running server"),
        }
    }
}

impl std::error::Error for SubscribeError {}

/// A conflated topic's window state.
struct Conflation {
    window: Duration,
    last_flush: Option<Instant>,
    scheduled: bool,
    /// Key → (latest frame, session to skip), waiting for the window's end.
    pending: IndexMap<Bytes, (Bytes, Option<usize>)>,
    /// Subscribers whose queue was too full: the latest frame per key, kept for them.
    lagging: HashMap<usize, IndexMap<Bytes, Bytes>>,
}

struct Topic {
    subscribers: IndexMap<usize, Session>,
    conflation: Option<Conflation>,
}

struct Core {
    index: usize,
    hub: Arc<Hub>,
    topics: HashMap<Arc<str>, Topic>,
    /// Session id → its topics, to leave them all at teardown.
    sessions: HashMap<usize, Vec<Arc<str>>>,
    /// Queued bytes above which a conflated topic holds messages back for a session.
    tally: Tally,
}

/// A core's delivery bookkeeping, apart from its registry so both can be borrowed.
struct Tally {
    /// Queued bytes above which a conflated topic holds messages back for a session.
    soft_limit: usize,
    /// Deliveries not yet added to the shared counter.
    delivered: u64,
    /// Superseded conflated values not yet added to the shared counter.
    conflated: u64,
}

/// Installs core `index`'s state on this thread; returns the task that serves its
/// inbox until the worker stops.
pub(crate) fn start(
    hub: Arc<Hub>,
    index: usize,
    max_outbound_bytes: usize,
    rx: mpsc::Receiver<Arc<Delivery>>,
) -> impl Future<Output = ()> + 'static {
    CORE.with(|cell| {
        *cell.borrow_mut() = Some(Core {
            index,
            hub,
            topics: HashMap::new(),
            sessions: HashMap::new(),
            tally: Tally {
                soft_limit: max_outbound_bytes / 2,
                delivered: 0,
                conflated: 0,
            },
        });
    });
    run(rx)
}

async fn run(mut rx: mpsc::Receiver<Arc<Delivery>>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        with_core(|core| {
            for delivery in batch.drain(..) {
                core.deliver(&delivery);
            }
            core.flush_counters();
        });
        batch.clear();
    }
}

fn with_core<R>(f: impl FnOnce(&mut Core) -> R) -> Option<R> {
    CORE.try_with(|cell| match cell.try_borrow_mut() {
        Ok(mut core) => core.as_mut().map(f),
        Err(_) => {
            tracing::error!("pubsub core state re-entered; operation skipped");
            None
        }
    })
    .ok()
    .flatten()
}

/// Subscribes `session` to `topic` on its core. Returns whether it was new.
pub fn subscribe(session: &Session, topic: &str) -> Result<bool, SubscribeError> {
    if !valid_topic(topic) {
        return Err(SubscribeError::BadTopic);
    }
    if !session.is_accepted() {
        return Err(SubscribeError::NotAccepted);
    }
    let id = session.id();
    let (added, first) =
        with_core(|core| core.subscribe(session, topic)).ok_or(SubscribeError::NotRunning)??;
    if first {
        // Every way out of the session leaves its topics (ARCHITECTURE.md rule 6).
        session.on_teardown(Box::new(move || {
            with_core(|core| core.remove_session(id));
        }));
    }
    Ok(added)
}

/// Unsubscribes `session` from `topic`. Returns whether it was subscribed.
pub fn unsubscribe(session: &Session, topic: &str) -> bool {
    with_core(|core| core.unsubscribe(session.id(), topic)).unwrap_or(false)
}

/// The topics `session` is subscribed to.
pub fn topics_of(session: &Session) -> Vec<String> {
    with_core(|core| {
        core.sessions
            .get(&session.id())
            .map(|topics| topics.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

/// Publishes from a session's handler: delivered on this core at once, sent to the
/// other cores' inboxes and to the broker. `include_self`: whether the sender gets it
/// too (if subscribed). `key`: the conflation key (default: the sender).
pub fn publish_from_session(
    session: &Session,
    topic: &str,
    message: &Message,
    key: Option<Bytes>,
    include_self: bool,
) -> Result<(), PublishError> {
    if !valid_topic(topic) {
        return Err(PublishError::BadTopic);
    }
    let frame = encode_message(message);
    let id = session.id();
    with_core(|core| {
        let delivery = Arc::new(Delivery {
            topic: topic.into(),
            frame,
            key: key.unwrap_or_else(|| session_key(core.index, id)),
            exclude: (!include_self).then_some((core.index, id)),
        });
        core.deliver(&delivery);
        core.flush_counters();
        core.hub.publish(delivery, Some(core.index))
    })
    .ok_or(PublishError::NotRunning)?
}

/// The default conflation key of a connection's publishes: the connection.
fn session_key(core: usize, id: usize) -> Bytes {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&(core as u64).to_be_bytes());
    key.extend_from_slice(&(id as u64).to_be_bytes());
    Bytes::from(key)
}

impl Core {
    fn subscribe(
        &mut self,
        session: &Session,
        topic: &str,
    ) -> Result<(bool, bool), SubscribeError> {
        let id = session.id();
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
                let conflation = self.hub.conflation_window(topic).map(|window| Conflation {
                    window,
                    last_flush: None,
                    scheduled: false,
                    pending: IndexMap::new(),
                    lagging: HashMap::new(),
                });
                self.topics.insert(
                    name.clone(),
                    Topic {
                        subscribers: IndexMap::new(),
                        conflation,
                    },
                );
                name
            }
        };
        let Some(entry) = self.topics.get_mut(&name) else {
            return Err(SubscribeError::NotRunning);
        };
        entry.subscribers.insert(id, session.clone());
        topics.push(name.clone());
        self.hub.directory_add(self.index, &name);
        Ok((true, first))
    }

    fn unsubscribe(&mut self, id: usize, topic: &str) -> bool {
        let Some(topics) = self.sessions.get_mut(&id) else {
            return false;
        };
        let Some(at) = topics.iter().position(|t| &**t == topic) else {
            return false;
        };
        topics.swap_remove(at);
        self.leave(id, topic);
        true
    }

    /// Leaves every topic of a session that ended.
    fn remove_session(&mut self, id: usize) {
        for topic in self.sessions.remove(&id).unwrap_or_default() {
            self.leave(id, &topic);
        }
    }

    fn leave(&mut self, id: usize, topic: &str) {
        if let Some(entry) = self.topics.get_mut(topic) {
            entry.subscribers.swap_remove(&id);
            if let Some(conflation) = entry.conflation.as_mut() {
                conflation.lagging.remove(&id);
            }
            if entry.subscribers.is_empty() {
                self.topics.remove(topic);
            }
        }
        self.hub.directory_remove(self.index, topic);
    }

    /// Queues `delivery` to this core's subscribers of its topic.
    fn deliver(&mut self, delivery: &Delivery) {
        let Some(topic) = self.topics.get_mut(&*delivery.topic) else {
            return;
        };
        let exclude = delivery
            .exclude
            .filter(|(core, _)| *core == self.index)
            .map(|(_, id)| id);
        let Some(conflation) = topic.conflation.as_mut() else {
            for (id, session) in &topic.subscribers {
                if Some(*id) != exclude && session.send_frame(delivery.frame.clone()).is_ok() {
                    self.tally.delivered += 1;
                }
            }
            return;
        };
        let now = Instant::now();
        let window_open = conflation
            .last_flush
            .is_none_or(|at| now >= at + conflation.window);
        if window_open && !conflation.scheduled && conflation.lagging.is_empty() {
            // The first message after a quiet window goes out at once.
            conflation.last_flush = Some(now);
            for (id, session) in &topic.subscribers {
                if Some(*id) != exclude {
                    deliver_conflated(
                        session,
                        *id,
                        &delivery.key,
                        &delivery.frame,
                        &mut conflation.lagging,
                        &mut self.tally,
                    );
                }
            }
            return;
        }
        if conflation
            .pending
            .insert(delivery.key.clone(), (delivery.frame.clone(), exclude))
            .is_some()
        {
            self.tally.conflated += 1;
        }
        if !conflation.scheduled {
            conflation.scheduled = true;
            let at = conflation
                .last_flush
                .map_or(now, |at| at + conflation.window);
            schedule_flush(delivery.topic.clone(), at);
        }
    }

    /// The end of a conflation window: the latest value of each key goes out.
    fn flush_window(&mut self, name: &str) {
        let Some(topic) = self.topics.get_mut(name) else {
            return;
        };
        let Some(conflation) = topic.conflation.as_mut() else {
            return;
        };
        conflation.scheduled = false;
        conflation.last_flush = Some(Instant::now());
        let pending = std::mem::take(&mut conflation.pending);
        for (id, session) in &topic.subscribers {
            // Values held back for this subscriber go first, if it has drained.
            if let Some(mut held) = conflation.lagging.remove(id) {
                for (key, (frame, skip)) in &pending {
                    if *skip != Some(*id) && held.insert(key.clone(), frame.clone()).is_some() {
                        self.tally.conflated += 1;
                    }
                }
                if session.queued_bytes() > self.tally.soft_limit {
                    conflation.lagging.insert(*id, held);
                } else {
                    for (_, frame) in held {
                        if session.send_frame(frame).is_ok() {
                            self.tally.delivered += 1;
                        }
                    }
                }
                continue;
            }
            for (key, (frame, skip)) in &pending {
                if *skip != Some(*id) {
                    deliver_conflated(
                        session,
                        *id,
                        key,
                        frame,
                        &mut conflation.lagging,
                        &mut self.tally,
                    );
                }
            }
        }
        if !conflation.lagging.is_empty() {
            // Keep the window ticking until every held value is out.
            conflation.scheduled = true;
            let at = Instant::now() + conflation.window;
            schedule_flush(name.into(), at);
        }
        self.flush_counters();
    }

    fn flush_counters(&mut self) {
        let metrics = &self.hub.metrics;
        if self.tally.delivered > 0 {
            metrics
                .delivered
                .fetch_add(std::mem::take(&mut self.tally.delivered), Ordering::Relaxed);
        }
        if self.tally.conflated > 0 {
            metrics
                .conflated
                .fetch_add(std::mem::take(&mut self.tally.conflated), Ordering::Relaxed);
        }
    }
}

/// Queues a conflated message to one subscriber, or holds it back (latest per key)
/// while the subscriber's queue is above the soft limit.
fn deliver_conflated(
    session: &Session,
    id: usize,
    key: &Bytes,
    frame: &Bytes,
    lagging: &mut HashMap<usize, IndexMap<Bytes, Bytes>>,
    tally: &mut Tally,
) {
    if session.queued_bytes() > tally.soft_limit {
        if lagging
            .entry(id)
            .or_default()
            .insert(key.clone(), frame.clone())
            .is_some()
        {
            tally.conflated += 1;
        }
    } else if session.send_frame(frame.clone()).is_ok() {
        tally.delivered += 1;
    }
}

fn schedule_flush(topic: Arc<str>, at: Instant) {
    tokio::task::spawn_local(async move {
        tokio::time::sleep_until(at).await;
        with_core(|core| core.flush_window(&topic));
    });
}
