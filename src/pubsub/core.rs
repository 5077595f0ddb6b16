//! One core's side of pubsub: its topic registry, its inbox task, conflation windows.
//!
//! The state lives in a thread-local, because a core is a thread (one pinned worker)
//! and everything here is `!Send` (sessions). Nothing in it is shared with other cores.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use indexmap::IndexMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Delivery, Hub, PublishError, encode_message, valid_topic};
use crate::proto::Message;
use crate::runtime::{Feed, Session, unfollow};

/// Topics one session may be subscribed to at once. Default 1,024.
pub const MAX_TOPICS_PER_SESSION: usize = 1024;

/// Distinct keys a conflated topic collects within one window (each core). A new key
/// beyond it does not wait for the window's end: the window is delivered at once
/// (counted in `ringsocket_pubsub_conflation_early_flushes_total` and logged), so keys
/// chosen by clients cannot grow it without bound. The same happens once the pending
/// values pass half of `max_outbound_bytes`. Default 4,096.
pub const MAX_CONFLATION_KEYS: usize = 4096;

/// Keys whose latest value a conflated topic holds for one lagging subscriber (one
/// whose queue is above half of `max_outbound_bytes`). Beyond it, or once the held
/// keys and values pass half of `max_outbound_bytes`, the keys held longest are
/// dropped, down to three quarters of both limits (counted in
/// `ringsocket_pubsub_conflation_dropped_total` and logged). Default 4,096.
pub const MAX_HELD_KEYS: usize = 4096;

/// A session's key in this core's maps and in [`Delivery::exclude`]: the id the runtime
/// gives it, unique among the live sessions of its core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(usize);

impl SessionId {
    /// The id of `session`: the one place pubsub takes it from the runtime.
    pub(crate) fn of(session: &Session) -> Self {
        Self(session.id())
    }

    /// An id the runtime reported on its own ([`Feed::take_closing`]), as
    /// [`Self::of`] would give it.
    fn reported(id: usize) -> Self {
        Self(id)
    }

    /// The id as bytes (for the default conflation key).
    fn to_be_bytes(self) -> [u8; 8] {
        (self.0 as u64).to_be_bytes()
    }
}

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
    /// The flush scheduled for the window's end, if any: a timer that finds another
    /// id here (the window was flushed early) does nothing.
    timer: Option<u64>,
    /// Key → (latest frame, session to skip), waiting for the window's end. At most
    /// [`MAX_CONFLATION_KEYS`] keys.
    pending: IndexMap<Bytes, (Bytes, Option<SessionId>)>,
    /// Bytes of the keys and frames in `pending`.
    pending_bytes: usize,
    /// Subscribers whose queue was too full: the latest frame per key, kept for them.
    lagging: HashMap<SessionId, Held>,
}

impl Conflation {
    /// Schedules the flush of this window at `at`, under a new timer id (a timer that
    /// finds another id when it fires does nothing).
    fn arm(&mut self, next_timer: &mut u64, topic: Arc<str>, at: Instant) {
        let id = *next_timer;
        *next_timer += 1;
        self.timer = Some(id);
        schedule_flush(topic, id, at);
    }
}

/// The values a conflated topic holds for one lagging subscriber, in the order their
/// keys were first held (a newer value of a key keeps its place).
#[derive(Default)]
struct Held {
    values: IndexMap<Bytes, Bytes>,
    bytes: usize,
}

struct Topic {
    subscribers: IndexMap<SessionId, Session>,
    conflation: Option<Conflation>,
    /// A plain (not conflated) topic's broadcasts, followed by its subscribers that
    /// are in no other topic: a publish costs them one append, whatever their number
    /// (see `runtime::feed`). A session follows one feed at most, so that one write
    /// keeps the order of everything it is sent.
    feed: Option<Rc<Feed>>,
    /// The plain topic's other subscribers (in several topics), sent each frame.
    direct: IndexMap<SessionId, Session>,
}

pub(super) struct Core {
    index: usize,
    hub: Arc<Hub>,
    topics: HashMap<Arc<str>, Topic>,
    /// Session id → its topics, to leave them all at teardown.
    sessions: HashMap<SessionId, Vec<Arc<str>>>,
    /// The id of the next conflation timer.
    next_timer: u64,
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
    /// Values dropped for lagging subscribers over [`MAX_HELD_KEYS`] or the soft limit,
    /// not yet added to the shared counter.
    held_dropped: u64,
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
            next_timer: 0,
            tally: Tally {
                soft_limit: max_outbound_bytes / 2,
                delivered: 0,
                conflated: 0,
                held_dropped: 0,
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

pub(super) fn with_core<R>(f: impl FnOnce(&mut Core) -> R) -> Option<R> {
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
    let id = SessionId::of(session);
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
    with_core(|core| core.unsubscribe(SessionId::of(session), topic)).unwrap_or(false)
}

/// The topics `session` is subscribed to.
pub fn topics_of(session: &Session) -> Vec<String> {
    with_core(|core| {
        core.sessions
            .get(&SessionId::of(session))
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
    let id = SessionId::of(session);
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
fn session_key(core: usize, id: SessionId) -> Bytes {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&(core as u64).to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    Bytes::from(key)
}

impl Core {
    fn subscribe(
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
                let conflation = self.hub.conflation_window(topic).map(|window| Conflation {
                    window,
                    last_flush: None,
                    timer: None,
                    pending: IndexMap::new(),
                    pending_bytes: 0,
                    lagging: HashMap::new(),
                });
                let feed = conflation.is_none().then(Feed::new);
                self.topics.insert(
                    name.clone(),
                    Topic {
                        subscribers: IndexMap::new(),
                        conflation,
                        feed,
                        direct: IndexMap::new(),
                    },
                );
                name
            }
        };
        if let [only] = &topics[..] {
            // In two topics now: sent each frame of both, in the order published.
            if let Some(first) = self.topics.get_mut(only) {
                if first
                    .feed
                    .as_ref()
                    .is_some_and(|f| f.is_followed_by(session))
                {
                    unfollow(session);
                    first.direct.insert(id, session.clone());
                }
            }
        }
        let Some(entry) = self.topics.get_mut(&name) else {
            return Err(SubscribeError::NotRunning);
        };
        entry.subscribers.insert(id, session.clone());
        match &entry.feed {
            Some(feed) if topics.is_empty() => feed.follow(session),
            Some(_) => {
                entry.direct.insert(id, session.clone());
            }
            None => {}
        }
        topics.push(name.clone());
        self.hub.directory_add(self.index, &name);
        Ok((true, first))
    }

    fn unsubscribe(&mut self, id: SessionId, topic: &str) -> bool {
        let Some(topics) = self.sessions.get_mut(&id) else {
            return false;
        };
        let Some(at) = topics.iter().position(|t| &**t == topic) else {
            return false;
        };
        topics.swap_remove(at);
        let remaining = match &topics[..] {
            [only] => Some(only.clone()),
            _ => None,
        };
        self.leave(id, topic);
        if let Some(only) = remaining {
            // In one topic again: back to following its feed. Everything published
            // before is in the session's queue already.
            if let Some(entry) = self.topics.get_mut(&only) {
                if let (Some(feed), Some(session)) = (&entry.feed, entry.direct.swap_remove(&id)) {
                    feed.follow(&session);
                }
            }
        }
        true
    }

    /// Whether `session` follows the feed of `topic` (tests).
    #[cfg(test)]
    pub(super) fn follows_feed(&self, session: &Session, topic: &str) -> bool {
        self.topics
            .get(topic)
            .and_then(|topic| topic.feed.as_ref())
            .is_some_and(|feed| feed.is_followed_by(session))
    }

    /// Leaves every topic of a session that ended.
    fn remove_session(&mut self, id: SessionId) {
        for topic in self.sessions.remove(&id).unwrap_or_default() {
            self.leave(id, &topic);
        }
    }

    fn leave(&mut self, id: SessionId, topic: &str) {
        if let Some(entry) = self.topics.get_mut(topic) {
            let session = entry.subscribers.swap_remove(&id);
            entry.direct.swap_remove(&id);
            if let (Some(feed), Some(session)) = (&entry.feed, session) {
                if feed.is_followed_by(&session) {
                    unfollow(&session);
                }
            }
            if let Some(conflation) = entry.conflation.as_mut() {
                conflation.lagging.remove(&id);
            }
            if entry.subscribers.is_empty() {
                self.topics.remove(topic);
            }
        }
        self.hub.directory_remove(self.index, topic);
    }

    /// Takes subscribers that can no longer be sent to (their connection is closing
    /// or has ended) out of `topic` right away, rather than when their close completes
    /// (up to the close timeout later): later publishes skip them. Their teardown then
    /// finds nothing left to do here.
    fn leave_closing(&mut self, topic: &str, closing: Vec<SessionId>) {
        for id in closing {
            self.unsubscribe(id, topic);
        }
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
        // Allocates only when a subscriber is closing.
        let mut closing = Vec::new();
        let Some(conflation) = topic.conflation.as_mut() else {
            if let Some(feed) = &topic.feed {
                // Followers the flusher found closing leave now. The report is checked
                // against the subscriber under that id now, which may have changed
                // since: only one that cannot be sent to leaves.
                closing.extend(
                    feed.take_closing()
                        .into_iter()
                        .map(SessionId::reported)
                        .filter(|id| {
                            topic
                                .subscribers
                                .get(id)
                                .is_some_and(|session| !session.can_send())
                        }),
                );
                let skip = exclude
                    .and_then(|id| topic.subscribers.get(&id))
                    .filter(|session| feed.is_followed_by(session));
                match skip {
                    Some(session) => feed.push_except(&delivery.frame, session),
                    None => feed.push(&delivery.frame),
                }
                self.tally.delivered += (feed.followers() - usize::from(skip.is_some())) as u64;
            }
            for (id, session) in &topic.direct {
                if Some(*id) == exclude {
                    continue;
                }
                if session.send_frame(delivery.frame.clone()).is_ok() {
                    self.tally.delivered += 1;
                } else {
                    closing.push(*id);
                }
            }
            self.leave_closing(&delivery.topic, closing);
            return;
        };
        let now = Instant::now();
        let window_open = conflation
            .last_flush
            .is_none_or(|at| now >= at + conflation.window);
        if window_open && conflation.timer.is_none() && conflation.lagging.is_empty() {
            // The first message after a quiet window goes out at once.
            conflation.last_flush = Some(now);
            for (id, session) in &topic.subscribers {
                if Some(*id) != exclude
                    && !deliver_conflated(
                        session,
                        *id,
                        &delivery.key,
                        &delivery.frame,
                        &mut conflation.lagging,
                        &mut self.tally,
                    )
                {
                    closing.push(*id);
                }
            }
            self.leave_closing(&delivery.topic, closing);
            return;
        }
        // Keys count too: they may be as long as a message.
        conflation.pending_bytes += delivery.frame.len();
        match conflation
            .pending
            .insert(delivery.key.clone(), (delivery.frame.clone(), exclude))
        {
            Some((old, _)) => {
                conflation.pending_bytes -= old.len();
                self.tally.conflated += 1;
            }
            None => conflation.pending_bytes += delivery.key.len(),
        }
        if conflation.pending.len() >= MAX_CONFLATION_KEYS
            || conflation.pending_bytes > self.tally.soft_limit
        {
            let (keys, bytes) = (conflation.pending.len(), conflation.pending_bytes);
            let before = self
                .hub
                .metrics
                .conflation_early_flushes
                .fetch_add(1, Ordering::Relaxed);
            let early = before + 1;
            if crossed_power_of_two(before, early) {
                tracing::warn!(
                    topic = %delivery.topic,
                    keys,
                    bytes,
                    early_flushes = early,
                    "conflation window full ({MAX_CONFLATION_KEYS} keys or {} bytes): delivered before the window's end",
                    self.tally.soft_limit
                );
            }
            self.flush_window(&delivery.topic);
            return;
        }
        if conflation.timer.is_none() {
            let at = conflation
                .last_flush
                .map_or(now, |at| at + conflation.window);
            conflation.arm(&mut self.next_timer, delivery.topic.clone(), at);
        }
    }

    /// A conflation timer fired: flushes the window unless it was flushed early since.
    fn on_timer(&mut self, name: &str, id: u64) {
        let current = self
            .topics
            .get(name)
            .and_then(|topic| topic.conflation.as_ref())
            .is_some_and(|conflation| conflation.timer == Some(id));
        if current {
            self.flush_window(name);
        }
    }

    /// The end of a conflation window (or a full window): the latest value of each key
    /// goes out.
    fn flush_window(&mut self, name: &str) {
        let Some(topic) = self.topics.get_mut(name) else {
            return;
        };
        let Some(conflation) = topic.conflation.as_mut() else {
            return;
        };
        conflation.timer = None;
        conflation.last_flush = Some(Instant::now());
        conflation.pending_bytes = 0;
        let pending = std::mem::take(&mut conflation.pending);
        let mut closing = Vec::new();
        for (id, session) in &topic.subscribers {
            // Values held back for this subscriber go first, if it has drained.
            if let Some(mut held) = conflation.lagging.remove(id) {
                for (key, (frame, skip)) in &pending {
                    if *skip != Some(*id) {
                        held.hold(key, frame, &mut self.tally);
                    }
                }
                if session.queued_bytes() > self.tally.soft_limit {
                    conflation.lagging.insert(*id, held);
                    continue;
                }
                for (_, frame) in held.values {
                    if session.send_frame(frame).is_err() {
                        closing.push(*id);
                        break;
                    }
                    self.tally.delivered += 1;
                }
                continue;
            }
            for (key, (frame, skip)) in &pending {
                if *skip != Some(*id)
                    && !deliver_conflated(
                        session,
                        *id,
                        key,
                        frame,
                        &mut conflation.lagging,
                        &mut self.tally,
                    )
                {
                    closing.push(*id);
                    break;
                }
            }
        }
        if !conflation.lagging.is_empty() {
            // Keep the window ticking until every held value is out.
            let at = Instant::now() + conflation.window;
            conflation.arm(&mut self.next_timer, name.into(), at);
        }
        self.leave_closing(name, closing);
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
        if self.tally.held_dropped > 0 {
            let n = std::mem::take(&mut self.tally.held_dropped);
            let before = metrics.conflation_dropped.fetch_add(n, Ordering::Relaxed);
            if crossed_power_of_two(before, before + n) {
                tracing::warn!(
                    dropped = before + n,
                    "conflation: lagging subscribers held more than {MAX_HELD_KEYS} keys or {} bytes; the keys they held longest were dropped",
                    self.tally.soft_limit
                );
            }
        }
    }
}

/// Queues a conflated message to one subscriber, or holds it back (latest per key)
/// while the subscriber's queue is above the soft limit. False when the subscriber's
/// connection is closing (nothing can be sent to it any more).
fn deliver_conflated(
    session: &Session,
    id: SessionId,
    key: &Bytes,
    frame: &Bytes,
    lagging: &mut HashMap<SessionId, Held>,
    tally: &mut Tally,
) -> bool {
    if session.queued_bytes() > tally.soft_limit {
        lagging.entry(id).or_default().hold(key, frame, tally);
        return true;
    }
    let sent = session.send_frame(frame.clone()).is_ok();
    tally.delivered += u64::from(sent);
    sent
}

impl Held {
    /// Keeps `frame` as the latest value of `key`. Past [`MAX_HELD_KEYS`] keys or the
    /// soft limit in bytes, drops the keys held longest (never the one just held) down to
    /// three quarters of both: each drop then costs O(1) amortized, although removing
    /// from the front of an `IndexMap` shifts the rest.
    fn hold(&mut self, key: &Bytes, frame: &Bytes, tally: &mut Tally) {
        // Keys count too: they may be as long as a message.
        self.bytes += frame.len();
        match self.values.insert(key.clone(), frame.clone()) {
            Some(old) => {
                self.bytes -= old.len();
                tally.conflated += 1;
            }
            None => self.bytes += key.len(),
        }
        if self.values.len() <= MAX_HELD_KEYS && self.bytes <= tally.soft_limit {
            return;
        }
        let (keys, bytes) = (MAX_HELD_KEYS / 4 * 3, tally.soft_limit / 4 * 3);
        let newest = self.values.len() - 1;
        let mut drop = 0;
        while drop < newest && (self.values.len() - drop > keys || self.bytes > bytes) {
            if let Some((key, frame)) = self.values.get_index(drop) {
                self.bytes -= key.len() + frame.len();
            }
            drop += 1;
        }
        self.values.drain(..drop);
        tally.held_dropped += drop as u64;
    }
}

/// Whether a counter going from `before` to `after` reached a new power of two: log
/// lines at 1, 2, 4, 8, ... events, never a flood.
fn crossed_power_of_two(before: u64, after: u64) -> bool {
    after > 0 && (before == 0 || after.ilog2() > before.ilog2())
}

fn schedule_flush(topic: Arc<str>, id: u64, at: Instant) {
    tokio::task::spawn_local(async move {
        tokio::time::sleep_until(at).await;
        with_core(|core| core.on_timer(&topic, id));
    });
}
