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
use super::history::Since;
use super::registry::{Mode, Registry, SessionId, SubscribeError};
use super::{Delivery, Hub, Position, PublishError, public_name, v1_name, valid_topic};
use crate::broker::Snapshot;
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
    let mut topics =
        with_core(|core| core.registry.topics_of(SessionId::of(session))).unwrap_or_default();
    for topic in &mut topics {
        if public_name(topic).len() != topic.len() {
            *topic = public_name(topic).to_owned();
        }
    }
    topics
}

/// A `ringsocket.v1` subscription, as [`subscribe_v1`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Subscribed {
    /// Where the subscription starts: the last offset this connection's core delivered
    /// of the topic (or `since`, when the client had heard more), and the topic's
    /// epoch. The recovered publications end at it; live ones follow.
    pub position: Position,
    /// Whether every publication after `since` was queued (false without `since`).
    pub recovered: bool,
    /// Publications after `since` queued from the history (after the reply).
    pub missed: usize,
    /// Whether the topic is conflated (its offsets skip by design).
    pub conflated: bool,
}

/// Subscribes `session` to the `ringsocket.v1` side of `topic`: queues the reply that
/// `reply` makes from the subscription, then the publications after `since` that this
/// core delivered already (from the history), then registers the session, all in one
/// turn of the core: every later publication reaches it through the core's inbox, so
/// nothing is missed or sent twice. A repeated subscription queues the reply and the
/// recovered publications again.
pub fn subscribe_v1(
    session: &Session,
    topic: &str,
    since: Option<&Since>,
    snapshot: Option<&Snapshot>,
    reply: impl FnOnce(&V1Subscribed) -> Message,
) -> Result<V1Subscribed, SubscribeError> {
    if !valid_topic(topic) {
        return Err(SubscribeError::BadTopic);
    }
    if !session.is_accepted() {
        return Err(SubscribeError::NotAccepted);
    }
    let id = SessionId::of(session);
    let name = v1_name(topic);
    // What a numbering broker's history holds, as this process keeps publications.
    let snapshot = snapshot.map(|s| (s.epoch.clone(), s.top, super::snapshot_data(s)));
    with_core(|core| {
        let hub = core.hub.clone();
        let conflated = hub.conflation_window(topic).is_some();
        let idle = hub.subscribers(topic) == 0;
        let settings = hub.history.settings();
        let (subscribed, frames) = hub.history.with_topic(topic, |log| {
            let mut position = log.position_on(core.index);
            if let Some((epoch, top, entries)) = &snapshot {
                let (grew, new_epoch) = log.merge(topic, epoch, *top, entries, idle, &settings);
                hub.history.add(grew);
                // What the broker numbered up to `top` is either kept here now or on
                // its way to this core (a few duplicates, which the client drops); in a
                // new epoch what this core delivered belongs to the old one.
                position = log.position_on(core.index);
                position.offset = if new_epoch {
                    *top
                } else {
                    position.offset.max(*top)
                };
            }
            let recovery = since.map(|since| log.since(since, position.offset, usize::MAX));
            let frames = recovery
                .as_ref()
                .map(|r| r.frames.clone())
                .unwrap_or_default();
            let recovered = recovery.is_some_and(|r| r.recovered);
            if let Some(since) = since.filter(|s| recovered && s.offset > position.offset) {
                // The client heard more than this core delivered so far (it was on
                // another core): what this core still delivers up to `since` is a
                // duplicate, which the client drops by this offset.
                position.offset = since.offset;
            }
            let subscribed = V1Subscribed {
                position,
                recovered,
                missed: frames.len(),
                conflated,
            };
            (subscribed, frames)
        });
        hub.history.check_limit();
        hub.history.sweep(|topic| hub.subscribers(topic) > 0);
        if core.registry.topic_count(id) >= super::MAX_TOPICS_PER_SESSION
            && !core.registry.topics_of(id).contains(&name)
        {
            return Err(SubscribeError::TooManyTopics);
        }
        // Registered, then the reply and the recovered publications queued, in one
        // turn of this core: no delivery falls between them and the live ones, which
        // are written after what the session's own queue holds.
        let (_, first) = core.registry.subscribe(session, &name)?;
        if first {
            session.on_teardown(Box::new(move || {
                with_core(|core| core.registry.remove_session(id));
            }));
        }
        let _ = session.send(reply(&subscribed));
        for frame in frames {
            let _ = session.send_frame(frame);
        }
        if since.is_some() {
            let counter = if subscribed.recovered {
                &hub.metrics.recovered
            } else {
                &hub.metrics.not_recovered
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Ok(subscribed)
    })
    .ok_or(SubscribeError::NotRunning)?
}

/// With a numbering broker: asks it for `topic`'s epoch, last offset and kept
/// publications after `since` (for [`subscribe_v1`]); `None` without one (the
/// history is this process's). The answer is `Err` when the broker could not read it
/// (Redis away): the subscription then goes by what this process has.
pub fn v1_snapshot(
    topic: &str,
    since: u64,
) -> Option<tokio::sync::oneshot::Receiver<Result<Snapshot, String>>> {
    with_core(|core| {
        let limit = core.hub.history.settings().size.max(1);
        core.hub.broker_history(topic, since, limit)
    })
    .flatten()
}

/// Unsubscribes `session` from the `ringsocket.v1` side of `topic`. Returns whether it
/// was subscribed.
pub fn unsubscribe_v1(session: &Session, topic: &str) -> bool {
    unsubscribe(session, &v1_name(topic))
}

/// The position of a `ringsocket.v1` publish: now (this process numbers it), or
/// later (a numbering broker tells it once it has numbered the publication; `None`
/// if it cannot say).
#[derive(Debug)]
pub enum V1Ack {
    /// Numbered here.
    Now(Position),
    /// Numbered by the broker.
    Later(tokio::sync::oneshot::Receiver<Option<(u64, Arc<str>)>>),
}

/// Publishes `data` (one JSON value, checked by the caller) from a `ringsocket.v1`
/// connection to every subscriber of `topic` (raw ones get `data` as a text message),
/// the sender included if subscribed. Returns the publication's position, or how it
/// will come.
pub fn publish_v1(
    session: &Session,
    topic: &str,
    data: &str,
    key: Option<Bytes>,
) -> Result<V1Ack, PublishError> {
    let message = Message::Text(data.to_owned().into());
    publish_session(session, topic, &message, key, true, true)
}

/// Publishes from a session's handler: handed to the broker (which may refuse it:
/// [`PublishError::Unavailable`], delivered nowhere), then delivered on this core at
/// once and sent to the other cores' inboxes. `include_self`: whether the sender gets it
/// too (if subscribed). `key`: the conflation key (default: the sender).
pub fn publish_from_session(
    session: &Session,
    topic: &str,
    message: &Message,
    key: Option<Bytes>,
    include_self: bool,
) -> Result<(), PublishError> {
    publish_session(session, topic, message, key, include_self, false).map(drop)
}

fn publish_session(
    session: &Session,
    topic: &str,
    message: &Message,
    key: Option<Bytes>,
    include_self: bool,
    known_json: bool,
) -> Result<V1Ack, PublishError> {
    if !valid_topic(topic) {
        return Err(PublishError::BadTopic);
    }
    let id = SessionId::of(session);
    with_core(|core| {
        let hub = core.hub.clone();
        // With a numbering broker, a v1 publish learns its offset from it.
        let (ack, later) = if known_json && hub.sequenced() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let ack: crate::broker::Ack = Box::new(move |position| {
                let _ = tx.send(position);
            });
            (Some(ack), Some(rx))
        } else {
            (None, None)
        };
        // The broker first: a publish it refuses reaches no one, not even this core.
        hub.forward(topic, message, ack)?;
        let key = key.unwrap_or_else(|| session_key(core.index, id));
        let exclude = (!include_self).then_some((core.index, id));
        let ((sent, here), position) = hub.record(
            topic,
            message,
            known_json,
            key,
            exclude,
            |delivery, recorded| {
                // Delivered here at once when this core has delivered every earlier
                // publication of the topic handed to its inbox; otherwise this one goes
                // behind them, through the inbox, to keep the offsets in order. The
                // delivery itself happens after the topic's lock is released: only this
                // core delivers here, and it runs nothing else in between.
                if recorded.is_none_or(|r| r.in_order_on(core.index)) {
                    (
                        hub.publish(delivery.clone(), Some(core.index)),
                        Some(delivery),
                    )
                } else {
                    (hub.publish(delivery, None), None)
                }
            },
        );
        if let Some(delivery) = here {
            core.deliver(&delivery);
            core.flush_counters();
        }
        sent?;
        match (position, later) {
            (Some(position), _) => Ok(V1Ack::Now(position)),
            (None, Some(later)) => Ok(V1Ack::Later(later)),
            // Not a v1 publish with a numbering broker: nobody asks its position.
            (None, None) => Ok(V1Ack::Now(Position {
                offset: 0,
                epoch: Arc::from(""),
            })),
        }
    })
    .ok_or(PublishError::NotRunning)?
}

impl Core {
    /// Queues `delivery` to this core's subscribers of its topic, raw and
    /// `ringsocket.v1`, and notes its offset as delivered here.
    fn deliver(&mut self, delivery: &Delivery) {
        if delivery.raw {
            self.deliver_side(delivery);
        }
        if let Some(v1) = &delivery.v1 {
            if let Some(delivered) = v1.delivered.get(self.index) {
                delivered.0.store(v1.offset, Ordering::Release);
            }
            self.deliver_side(&v1.delivery);
        }
    }

    /// Queues one side of a publication to its subscribers on this core.
    fn deliver_side(&mut self, delivery: &Delivery) {
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
