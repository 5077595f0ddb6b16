//! One core's side of pubsub, the glue between its parts: the thread-local state (the
//! [`Registry`], the delivery counters), the inbox task, and the entry points a
//! session's handler calls. A delivery is routed here to [`Fanout`](super::fanout) for a
//! plain topic and to [`Conflation`](super::conflation) for a conflated one.
//!
//! The state lives in a thread-local, because a core is a thread (one pinned worker)
//! and everything here is `!Send` (sessions). Nothing in it is shared with other cores.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::conflation::{self, MAX_HELD_KEYS, crossed_power_of_two, session_key};
use super::registry::{Mode, Registry, SessionId, SubscribeError};
use super::{Delivery, Hub, PublishError, encode_message, valid_topic};
use crate::proto::Message;
use crate::runtime::Session;

thread_local! {
    static CORE: RefCell<Option<Core>> = const { RefCell::new(None) };
}

pub(super) struct Core {
    index: usize,
    hub: Arc<Hub>,
    registry: Registry,
    /// The id of the next conflation timer.
    next_timer: u64,
    tally: Tally,
}

/// A core's delivery bookkeeping, apart from its registry so both can be borrowed.
pub(super) struct Tally {
    /// Queued bytes above which a conflated topic holds messages back for a session.
    pub(super) soft_limit: usize,
    /// Deliveries not yet added to the shared counter.
    pub(super) delivered: u64,
    /// Superseded conflated values not yet added to the shared counter.
    pub(super) conflated: u64,
    /// Values dropped for lagging subscribers over [`MAX_HELD_KEYS`] or the soft limit,
    /// not yet added to the shared counter.
    pub(super) held_dropped: u64,
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
            registry: Registry::new(index, hub.clone()),
            hub,
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

/// Conflation timer `id` of `topic` fired (see [`conflation`]).
pub(super) fn timer_fired(topic: &str, id: u64) {
    with_core(|core| core.on_timer(topic, id));
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
    let (added, first) = with_core(|core| core.registry.subscribe(session, topic))
        .ok_or(SubscribeError::NotRunning)??;
    if first {
        // Every way out of the session leaves its topics (ARCHITECTURE.md rule 6).
        session.on_teardown(Box::new(move || {
            with_core(|core| core.registry.remove_session(id));
        }));
    }
    Ok(added)
}

/// Unsubscribes `session` from `topic`. Returns whether it was subscribed.
pub fn unsubscribe(session: &Session, topic: &str) -> bool {
    with_core(|core| core.registry.unsubscribe(SessionId::of(session), topic)).unwrap_or(false)
}

/// How many topics `session` is subscribed to.
pub fn topic_count(session: &Session) -> usize {
    with_core(|core| core.registry.topic_count(SessionId::of(session))).unwrap_or_default()
}

/// The topics `session` is subscribed to.
pub fn topics_of(session: &Session) -> Vec<String> {
    with_core(|core| core.registry.topics_of(SessionId::of(session))).unwrap_or_default()
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

impl Core {
    /// Queues `delivery` to this core's subscribers of its topic.
    fn deliver(&mut self, delivery: &Delivery) {
        let Some(topic) = self.registry.topic_mut(&delivery.topic) else {
            return;
        };
        let exclude = delivery
            .exclude
            .filter(|(core, _)| *core == self.index)
            .map(|(_, id)| id);
        // Allocates only when a subscriber is closing.
        let mut closing = Vec::new();
        match &mut topic.mode {
            Mode::Plain(fanout) => fanout.deliver(
                &topic.subscribers,
                &delivery.frame,
                exclude,
                &mut self.tally.delivered,
                &mut closing,
            ),
            Mode::Conflated(conflation) => conflation.publish(
                delivery,
                exclude,
                &topic.subscribers,
                &mut conflation::Ctx {
                    tally: &mut self.tally,
                    next_timer: &mut self.next_timer,
                    metrics: &self.hub.metrics,
                },
                &mut closing,
            ),
        }
        self.registry.leave_closing(&delivery.topic, closing);
    }

    /// A conflation timer of topic `name` fired.
    fn on_timer(&mut self, name: &str, id: u64) {
        let Some(topic) = self.registry.topic_mut(name) else {
            return;
        };
        let Mode::Conflated(conflation) = &mut topic.mode else {
            return;
        };
        let mut closing = Vec::new();
        conflation.on_timer(
            name,
            id,
            &topic.subscribers,
            &mut conflation::Ctx {
                tally: &mut self.tally,
                next_timer: &mut self.next_timer,
                metrics: &self.hub.metrics,
            },
            &mut closing,
        );
        self.registry.leave_closing(name, closing);
        self.flush_counters();
    }

    /// Whether `session` follows the feed of `topic` (tests).
    #[cfg(test)]
    pub(super) fn follows_feed(&self, session: &Session, topic: &str) -> bool {
        self.registry.follows_feed(session, topic)
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
