//! Rooms and broadcast: topics, per-core registries, cross-core fan-out, conflation.
//!
//! How one publish reaches every subscriber (ARCHITECTURE.md rules 2–4):
//!
//! 1. The message is framed **once** into a [`Bytes`] (an unmasked server frame).
//! 2. On the publishing core, the frame is appended once to the topic's **feed**, which
//!    every local subscriber that is in no other topic follows (a position in the
//!    feed, nothing per message), and the feed is put in the core's flush queue. The
//!    core's flusher then writes to each follower, with one non-blocking `sendmsg`,
//!    whatever its own queue holds followed by every feed frame past its position,
//!    which lie back to back: a burst costs each subscriber one system call with one
//!    slice, and a publish costs the same for 10 subscribers as for 10,000.
//!    Subscribers of several topics (or of a conflated topic) get a reference-counted
//!    clone of the frame in their own queue instead, so that one write keeps the order
//!    of everything they are sent; back in one topic, they follow its feed again.
//! 3. Every other core gets **one** message in its inbox (not one per subscriber) and
//!    does the same for its own subscribers. Inboxes are bounded channels that wake the
//!    receiving core; nothing is locked per message.
//! 4. With a [`Broker`] (e.g. Redis), the message also goes to the other processes, and
//!    messages from them come in through the broker's sink into every core's inbox.
//!    The broker gets the message first, before step 2: when its backlog is full it
//!    refuses, and the publish reaches no one ([`PublishError::Unavailable`]).
//!
//! Ordering: messages from one publisher reach each subscriber in publish order (each
//! inbox is FIFO and a core delivers in the order it receives), each exactly once.
//!
//! Registries: each core keeps `topic → its local subscribers` and `session → its
//! topics`. A session leaves every topic when it ends, on every way out, through the
//! runtime's single teardown path. Process-wide subscriber counts per topic are kept
//! under a lock taken only on subscribe and unsubscribe (never per message); they feed
//! `/metrics` and tell the broker which topics this process listens to.
//!
//! Conflation (opt-in per topic, [`Hub::conflate`]): within a window (default 16 ms),
//! only the latest message **per key** reaches each subscriber. The first message after
//! a quiet window goes out at once; later ones wait for the window's end, when the
//! latest value of each key is delivered, so the last value always arrives. The key:
//! - [`Publisher::publish_keyed`] / [`crate::app::WebSocket::publish_keyed`]: the key
//!   given (e.g. a user id for live cursors);
//! - a WebSocket's own publish without a key: the sending connection (each sender's
//!   latest value wins: one cursor per connection);
//! - [`Publisher::publish`] without a key and messages from other processes: the topic
//!   (the latest message of the topic wins).
//!
//! Slow consumers: a subscriber whose queued bytes pass `max_outbound_bytes` is closed
//! by its driver with the configured policy (1013 by default), without slowing the
//! others. On conflated topics a subscriber whose queue is above half that limit is
//! not sent more: the latest value per key is kept for it instead (superseded values
//! are dropped and counted) and delivered once its queue has drained.
//!
//! Limits, since conflation keys may come from clients:
//! - a window collects at most [`MAX_CONFLATION_KEYS`] keys (4,096) and half of
//!   `max_outbound_bytes` per topic and core; a full window is delivered at once
//!   instead of at its end (`ringsocket_pubsub_conflation_early_flushes_total`);
//! - a lagging subscriber is held at most [`MAX_HELD_KEYS`] keys (4,096) and half of
//!   `max_outbound_bytes` per topic; beyond, the keys held longest are dropped
//!   (`ringsocket_pubsub_conflation_dropped_total`). Each is logged at 1, 2, 4, 8, ...
//!   occurrences.
//!
//! A subscriber whose connection is closing (a slow consumer being closed, or any
//! other close) leaves its topics at the first publish that cannot be queued to it
//! (for a feed follower: the first publish after the flusher found it closing),
//! without waiting for its close to complete: later publishes do not visit it.
//!
//! # Parts
//!
//! This module is the process-wide side: [`Hub`] (the cores' inboxes, the subscriber
//! counts, the conflation settings, the broker) and [`Publisher`]. Each core's side is
//! in three parts, one concept each:
//!
//! - `registry`: which sessions are in which topics, both ways (`topic → subscribers`,
//!   `session → topics`, sessions keyed by their id); subscribe, unsubscribe, leaving
//!   every topic at teardown, and the counts in the hub;
//! - `fanout`: one publish of a plain topic to the core's subscribers: appended once to
//!   the feed that subscribers of that topic alone follow, a reference-counted copy to
//!   each subscriber of several, closing subscribers handed back to leave. Which of the
//!   two a subscriber gets (its route) is decided there, in one place, from its number
//!   of topics, because the runtime lets a session follow one feed at most;
//! - `conflation`: windows, keys, early flushes, the values held for lagging
//!   subscribers, and the timers that end the windows.
//!
//! What is left, `core`, is glue: the core's thread-local state, its inbox task, the
//! entry points a handler calls ([`subscribe`], [`publish_from_session`], ...) and the
//! dispatch of each publish to the fan-out or to conflation. A publish goes to the
//! broker as its message's kind and payload, before it is framed.

mod conflation;
mod core;
mod fanout;
mod history;
mod registry;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use tokio::sync::mpsc;

use crate::broker::{Accepted, Broker, BrokerSink, Inbound, Kind, Refused, Snapshot};
use crate::metrics::{counter, family, gauge};
use crate::proto::conn::encode_server_frame;
use crate::proto::{Message, OpCode};
use crate::runtime::LocalFuture;

pub use self::conflation::{MAX_CONFLATION_KEYS, MAX_HELD_KEYS};
pub use self::core::{
    V1Ack, V1Subscribed, publish_from_session, publish_v1, subscribe, subscribe_v1, topic_count,
    topics_of, unsubscribe, unsubscribe_v1, v1_snapshot,
};
pub use self::history::{
    DEFAULT_HISTORY_MEMORY_LIMIT, DEFAULT_HISTORY_SIZE, DEFAULT_HISTORY_TTL, HistorySettings,
    Position, Since,
};
use self::history::{History, Recorded};
use self::registry::SessionId;
pub use self::registry::{MAX_TOPICS_PER_SESSION, SubscribeError};

/// Messages a core's inbox holds before publishes to that core are dropped (counted in
/// `ringsocket_pubsub_inbox_dropped_total` and logged). Default 65,536.
pub const DEFAULT_INBOX_CAPACITY: usize = 65_536;

/// Topics with a label of their own in `/metrics` when no server said otherwise (the
/// `metrics_topics` setting's default).
pub const DEFAULT_METRICS_TOPICS: usize = 20;

/// The label of the sample that sums the topics not shown on their own.
pub const OTHER_TOPICS: &str = "_other";

/// The per-topic samples of `/metrics`, bounded: the `shown` topics with the most
/// subscribers (ties broken by name, so the page is stable between scrapes), by
/// subscribers then name, then one [`OTHER_TOPICS`] sample with the sum of the rest
/// (always there, 0 when nothing is left out). A topic that is itself named `_other`
/// is counted in that sample, so no label appears twice. The cost is one sort of the
/// topics per scrape; the page's size no longer grows with them.
pub(crate) fn bounded_topics(mut rows: Vec<(String, u64)>, shown: usize) -> Vec<(String, u64)> {
    let mut other = 0u64;
    rows.retain(|(topic, n)| {
        let keep = topic != OTHER_TOPICS;
        if !keep {
            other = other.saturating_add(*n);
        }
        keep
    });
    let by_rank = |a: &(String, u64), b: &(String, u64)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    if rows.len() > shown {
        if shown > 0 {
            rows.select_nth_unstable_by(shown - 1, by_rank);
        }
        for (_, n) in rows.drain(shown..) {
            other = other.saturating_add(n);
        }
    }
    rows.sort_unstable_by(by_rank);
    rows.push((OTHER_TOPICS.to_owned(), other));
    rows
}

/// The default conflation window: about one frame of a 60 Hz display.
pub const DEFAULT_CONFLATION_WINDOW: Duration = Duration::from_millis(16);

/// Longest topic name accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// One publish, shared by every core it is sent to.
pub(crate) struct Delivery {
    pub(crate) topic: Arc<str>,
    /// The frame, encoded once.
    pub(crate) frame: Bytes,
    /// The conflation key (see the module docs).
    pub(crate) key: Bytes,
    /// A session to skip: `(core, session)` of a sender that asked not to get it.
    pub(crate) exclude: Option<(usize, SessionId)>,
    /// The same publication for `ringsocket.v1` subscribers (none on a delivery that
    /// is itself that side).
    pub(crate) v1: Option<Box<V1Side>>,
    /// Whether raw subscribers get it (not when a numbering broker hands this process
    /// its own publication back: the raw side went out at the publish).
    pub(crate) raw: bool,
}

/// The `ringsocket.v1` side of a publication: its own delivery (registry name, frame)
/// and its offset, which the delivering core notes (see `history`).
pub(crate) struct V1Side {
    pub(crate) delivery: Delivery,
    pub(crate) offset: u64,
    /// Each core's last delivered offset of the topic (that core writes its own).
    pub(crate) delivered: history::PerCore,
    /// Each core's last offset handed to its inbox (the fan-out writes it).
    pub(crate) queued: history::PerCore,
}

/// What the registries of the cores call the `ringsocket.v1` side of `topic` (a name no
/// client can give: topic rules do not allow a NUL).
pub(crate) fn v1_name(topic: &str) -> String {
    format!("{V1_PREFIX}{topic}")
}

const V1_PREFIX: &str = "\u{0}v1:";

/// The topic a registry name stands for (its `ringsocket.v1` side's name included).
pub(crate) fn public_name(name: &str) -> &str {
    name.strip_prefix(V1_PREFIX).unwrap_or(name)
}

/// A page of a topic's history ([`Hub::history_page`]).
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The topic's last offset and its epoch; `None` for a topic this process has no
    /// offsets of (nothing published or subscribed lately).
    pub position: Option<Position>,
    /// Whether the publications after `since` are all still kept (those beyond the
    /// limit included).
    pub recovered: bool,
    /// The publications, oldest first: each the JSON text of a `ringsocket.v1`
    /// publication (`{"type":"pub","topic":…,"offset":…,"epoch":…,"data":…}`).
    pub publications: Vec<Bytes>,
}

/// Why a publish did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishError {
    /// The server is not running (not started yet, or stopped).
    NotRunning,
    /// The topic name is empty or longer than [`MAX_TOPIC_LEN`] (or, from a
    /// connection, outside the server's topic rules).
    BadTopic,
    /// The connection's grant (its JWT, or the `authorize` hook) does not allow
    /// publishing to this topic.
    NotAllowed,
    /// The broker's backlog (messages waiting to reach the other processes) is full:
    /// the publish was delivered nowhere, not even in this process. Retry later
    /// (`POST /publish` answers 503 with `Retry-After: 1`).
    Unavailable,
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRunning => f.write_str("the server is not running"),
            Self::BadTopic => write!(f, "topic names are 1 to {MAX_TOPIC_LEN} bytes, without NUL"),
            Self::NotAllowed => f.write_str("not allowed to publish"),
            Self::Unavailable => f.write_str("the broker's backlog is full; retry later"),
        }
    }
}

impl std::error::Error for PublishError {}

/// Whether `topic` is an acceptable topic name.
pub(crate) fn valid_topic(topic: &str) -> bool {
    // No NUL: the registries name the ringsocket.v1 side of a topic with one.
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.contains('\0')
}

/// Counters of the pubsub layer; per-core delivery counts are added in batches.
#[derive(Debug, Default)]
pub(crate) struct PubsubMetrics {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) inbox_dropped: AtomicU64,
    pub(crate) conflated: AtomicU64,
    pub(crate) conflation_early_flushes: AtomicU64,
    pub(crate) conflation_dropped: AtomicU64,
    pub(crate) from_broker: AtomicU64,
    /// `ringsocket.v1` subscriptions with `since` that recovered everything.
    pub(crate) recovered: AtomicU64,
    /// `ringsocket.v1` subscriptions with `since` that could not.
    pub(crate) not_recovered: AtomicU64,
}

/// The process-wide side of pubsub: the cores' inboxes, subscriber counts, conflation
/// settings and the broker. One per [`crate::app::App`]; shared by its [`Publisher`]s.
pub struct Hub {
    inboxes: OnceLock<Vec<mpsc::Sender<Arc<Delivery>>>>,
    /// Subscriptions held by each core (written by that core only).
    per_core: OnceLock<Vec<AtomicU64>>,
    /// Receivers, taken by each core as it starts.
    receivers: Mutex<Vec<Option<mpsc::Receiver<Arc<Delivery>>>>>,
    inbox_capacity: usize,
    /// Topic → subscribers in this process.
    directory: Mutex<HashMap<Arc<str>, usize>>,
    /// Conflated topics: exact names, or prefixes ending in `*`, with their window.
    conflation: Mutex<Vec<(String, Duration)>>,
    broker: OnceLock<Arc<dyn Broker>>,
    /// Topics with a label of their own in `/metrics` (`metrics_topics`).
    metrics_topics: AtomicUsize,
    /// Offsets, epochs and kept publications per topic (`ringsocket.v1`).
    history: History,
    pub(crate) metrics: PubsubMetrics,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("cores", &self.inboxes.get().map_or(0, Vec::len))
            .field("broker", &self.broker.get())
            .finish_non_exhaustive()
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(DEFAULT_INBOX_CAPACITY)
    }
}

impl Hub {
    /// A hub whose core inboxes hold `inbox_capacity` messages each.
    pub fn new(inbox_capacity: usize) -> Self {
        Self {
            inboxes: OnceLock::new(),
            per_core: OnceLock::new(),
            receivers: Mutex::new(Vec::new()),
            inbox_capacity: inbox_capacity.max(1),
            directory: Mutex::new(HashMap::new()),
            conflation: Mutex::new(Vec::new()),
            broker: OnceLock::new(),
            metrics_topics: AtomicUsize::new(DEFAULT_METRICS_TOPICS),
            history: History::default(),
            metrics: PubsubMetrics::default(),
        }
    }

    /// Sets the history's bounds (`history_size`, `history_ttl_secs`,
    /// `history_memory_limit`); the app does it when a server starts.
    pub fn set_history(&self, settings: HistorySettings) {
        self.history
            .configure(settings, self.inboxes.get().map_or(0, Vec::len));
    }

    /// The history's bounds.
    pub fn history_settings(&self) -> HistorySettings {
        self.history.settings()
    }

    /// Records `message` in `topic`'s history and runs `send` with its delivery (both
    /// sides: raw and `ringsocket.v1`), the topic's lock held so that every core gets
    /// the topic's publications in offset order. `known_json`: the text is one JSON
    /// value already (a `ringsocket.v1` client's `data`).
    pub(crate) fn record<R>(
        &self,
        topic: &str,
        message: &Message,
        known_json: bool,
        key: Bytes,
        exclude: Option<(usize, SessionId)>,
        send: impl FnOnce(Arc<Delivery>, Option<&Recorded>) -> R,
    ) -> (R, Option<Position>) {
        let frame = encode_message(message);
        if self.sequenced() {
            // The broker numbers it: the v1 side comes back from it, with its offset.
            let delivery = Arc::new(Delivery {
                topic: topic.into(),
                frame,
                key,
                exclude,
                v1: None,
                raw: true,
            });
            return (send(delivery, None), None);
        }
        self.history.sweep(|topic| self.subscribers(topic) > 0);
        let (out, position) = self.history.record(topic, message, known_json, |recorded| {
            let delivery = both_sides(topic, frame, key, exclude, &recorded, true);
            send(delivery, Some(&recorded))
        });
        (out, Some(position))
    }

    /// `GET /history/{topic}` from what a numbering broker's history holds
    /// ([`Broker::history`]).
    pub fn history_page_of(&self, topic: &str, snapshot: &Snapshot, since: u64) -> HistoryPage {
        let publications: Vec<Bytes> = snapshot_data(snapshot)
            .iter()
            .map(|(offset, data, base64)| {
                let frame = history::envelope(topic, *offset, &snapshot.epoch, data, *base64);
                history::frame_json(&frame)
            })
            .collect();
        let first = snapshot.entries.first().and_then(|e| e.position.as_ref());
        HistoryPage {
            position: Some(Position {
                offset: snapshot.top,
                epoch: snapshot.epoch.clone(),
            }),
            recovered: since >= snapshot.top || first.is_some_and(|(o, _)| *o <= since + 1),
            publications,
        }
    }

    /// With a numbering broker: asks its history for `topic`'s epoch, last offset and
    /// up to `limit` kept publications after `since`; the answer comes on the
    /// returned channel. `None` without such a broker.
    pub fn broker_history(
        &self,
        topic: &str,
        since: u64,
        limit: usize,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Snapshot, String>>> {
        let broker = self.broker().filter(|b| b.sequences())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        broker.history(
            topic,
            since,
            limit,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        Some(rx)
    }

    /// Whether the broker numbers publications (offsets and epochs shared by every
    /// process, history at the broker).
    pub fn sequenced(&self) -> bool {
        self.broker.get().is_some_and(|b| b.sequences())
    }

    /// A publication the broker numbered (`offset` in `epoch`), from another process
    /// or this one (`own`: its raw side went out at the publish). Recorded at that
    /// offset and fanned out to every core, unless it was seen already; when offsets
    /// are missing before it (the first time), reported as a gap for the broker to
    /// fill from its history.
    fn record_numbered(
        &self,
        topic: &str,
        message: &Message,
        (offset, epoch): (u64, &str),
        own: bool,
    ) -> Accepted {
        let frame = encode_message(message);
        self.history
            .record_at(topic, message, offset, epoch, |recorded| {
                let delivery = both_sides(topic, frame, Bytes::new(), None, &recorded, !own);
                let _ = self.fan_out(delivery, None);
            })
    }

    /// `GET /history/{topic}`: the topic's position and up to `limit` publications
    /// after `since` (whether every one after it is still kept).
    pub fn history_page(&self, topic: &str, since: u64, limit: usize) -> HistoryPage {
        // A topic with no log gets none made: backends can ask about any name.
        let page = self.history.peek(topic, |log| {
            let (position, recovered, frames) = log.page(since, limit);
            HistoryPage {
                position: Some(position),
                recovered,
                publications: frames.iter().map(history::frame_json).collect(),
            }
        });
        page.unwrap_or(HistoryPage {
            position: None,
            recovered: since == 0,
            publications: Vec::new(),
        })
    }

    /// Makes `pattern` a conflated topic (see the module docs): an exact topic name, or
    /// a prefix followed by `*` (`"cursors:*"`). Applies to topics first used after the
    /// call; configure before serving.
    pub fn conflate(&self, pattern: &str, window: Duration) {
        lock(&self.conflation).push((pattern.to_owned(), window.max(Duration::from_millis(1))));
    }

    /// The conflation window of `topic`, if it is conflated.
    pub(crate) fn conflation_window(&self, topic: &str) -> Option<Duration> {
        lock(&self.conflation)
            .iter()
            .find(|(pattern, _)| match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => topic == pattern,
            })
            .map(|(_, window)| *window)
    }

    /// Connects a broker: from now on publishes also go to the other processes. Its
    /// sink must be [`Publisher::broker_sink`] of this hub. Only one broker per hub.
    pub fn set_broker(&self, broker: Arc<dyn Broker>) -> Result<(), String> {
        for topic in lock(&self.directory).keys() {
            broker.subscribe(topic);
        }
        self.broker
            .set(broker)
            .map_err(|_| "this app already has a broker".to_owned())
    }

    /// Shows only the `n` topics with the most subscribers under their own label in
    /// `/metrics`, the rest summed under `topic="_other"` (0: only `_other`). The app
    /// sets it from `metrics_topics` when a server starts; a hub without a server keeps
    /// [`DEFAULT_METRICS_TOPICS`].
    pub fn set_metrics_topics(&self, n: usize) {
        self.metrics_topics.store(n, Ordering::Relaxed);
    }

    /// Topics shown under their own label in `/metrics`.
    pub fn metrics_topics(&self) -> usize {
        self.metrics_topics.load(Ordering::Relaxed)
    }

    /// The broker, if one is connected.
    pub fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.broker.get()
    }

    /// Creates one inbox per worker. Fails if this hub already serves a server.
    pub(crate) fn bind(&self, workers: usize) -> Result<(), String> {
        let mut receivers = lock(&self.receivers);
        let mut senders = Vec::with_capacity(workers);
        let mut rxs = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(self.inbox_capacity);
            senders.push(tx);
            rxs.push(Some(rx));
        }
        self.inboxes.set(senders).map_err(|_| {
            "this App's rooms are already bound to a server; build a new App for another server"
                .to_owned()
        })?;
        *receivers = rxs;
        self.history.configure(self.history.settings(), workers);
        let _ = self
            .per_core
            .set((0..workers).map(|_| AtomicU64::new(0)).collect());
        Ok(())
    }

    /// The task of core `index`: receives that core's inbox and delivers locally.
    /// Installs core `index`'s registry on the calling (worker) thread.
    pub(crate) fn core_task(
        self: &Arc<Self>,
        index: usize,
        max_outbound_bytes: usize,
    ) -> Option<LocalFuture<()>> {
        let rx = lock(&self.receivers).get_mut(index)?.take()?;
        Some(Box::pin(core::start(
            self.clone(),
            index,
            max_outbound_bytes,
            rx,
        )))
    }

    /// Sends `delivery` to every core but `skip`. Never blocks: a full inbox drops the
    /// message for that core (counted and logged).
    pub(crate) fn fan_out(
        &self,
        delivery: Arc<Delivery>,
        skip: Option<usize>,
    ) -> Result<(), PublishError> {
        let inboxes = self.inboxes.get().ok_or(PublishError::NotRunning)?;
        let mut closed = 0;
        for (index, inbox) in inboxes.iter().enumerate() {
            if Some(index) == skip {
                continue;
            }
            match inbox.try_send(delivery.clone()) {
                Ok(()) => {
                    if let Some(v1) = &delivery.v1 {
                        if let Some(queued) = v1.queued.get(index) {
                            queued.0.store(v1.offset, Ordering::Release);
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    let dropped = self.metrics.inbox_dropped.fetch_add(1, Ordering::Relaxed);
                    if dropped.is_power_of_two() {
                        tracing::warn!(core = index, topic = %delivery.topic, dropped = dropped + 1, capacity = self.inbox_capacity, "pubsub inbox full: message dropped for that core's subscribers");
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed += 1,
            }
        }
        if closed > 0 && closed + usize::from(skip.is_some()) >= inboxes.len() {
            return Err(PublishError::NotRunning);
        }
        Ok(())
    }

    /// The first step of a publish made in this process, before it is recorded or
    /// delivered to anyone: hands it to the broker, if there is one. When the broker
    /// refuses it (its backlog is full: [`PublishError::Unavailable`]), the publish must
    /// go nowhere, so that its caller's answer is true.
    /// `ack`, with a numbering broker, is told the offset and epoch it gives.
    pub(crate) fn forward(
        &self,
        topic: &str,
        message: &Message,
        ack: Option<crate::broker::Ack>,
    ) -> Result<(), PublishError> {
        if self.inboxes.get().is_none() {
            return Err(PublishError::NotRunning);
        }
        let Some(broker) = self.broker.get() else {
            return Ok(());
        };
        let (kind, payload) = broker_payload(message);
        let sent = match ack {
            Some(ack) => broker.publish_acked(topic, kind, payload, ack),
            None => broker.publish(topic, kind, payload),
        };
        sent.map_err(|refused| match refused {
            Refused::BacklogFull => PublishError::Unavailable,
            Refused::Stopped => PublishError::NotRunning,
        })
    }

    /// Sends a publish made in this process, which [`Hub::forward`] took, to every core
    /// but `skip` (the publishing core, which delivered it already), and counts it.
    pub(crate) fn publish(
        &self,
        delivery: Arc<Delivery>,
        skip: Option<usize>,
    ) -> Result<(), PublishError> {
        let sent = self.fan_out(delivery, skip);
        if sent.is_ok() {
            self.metrics.published.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Subscriptions held by each core: how evenly the kernel spread the subscribers.
    pub fn core_subscriptions(&self) -> Vec<u64> {
        self.per_core
            .get()
            .map(|cores| cores.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .unwrap_or_default()
    }

    /// Counts a subscription on `core`; the first one in the process subscribes the
    /// broker.
    pub(crate) fn directory_add(&self, core: usize, name: &Arc<str>) {
        if let Some(counter) = self.per_core.get().and_then(|c| c.get(core)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let topic = public_name(name);
        let mut directory = lock(&self.directory);
        let count = match directory.get_mut(topic) {
            Some(count) => count,
            None => directory.entry(Arc::from(topic)).or_insert(0),
        };
        *count += 1;
        if *count == 1 {
            if let Some(broker) = self.broker.get() {
                broker.subscribe(topic);
            }
        }
    }

    /// Counts an unsubscription on `core`; the last one in the process unsubscribes
    /// the broker.
    pub(crate) fn directory_remove(&self, core: usize, name: &str) {
        if let Some(counter) = self.per_core.get().and_then(|c| c.get(core)) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        let topic = public_name(name);
        let mut directory = lock(&self.directory);
        if let Some(count) = directory.get_mut(topic) {
            *count -= 1;
            if *count == 0 {
                directory.remove(topic);
                if let Some(broker) = self.broker.get() {
                    broker.unsubscribe(topic);
                }
            }
        }
    }

    /// Subscribers to `topic` in this process.
    pub fn subscribers(&self, topic: &str) -> usize {
        lock(&self.directory).get(topic).copied().unwrap_or(0)
    }

    /// Subscriptions in this process, over every topic.
    pub fn subscriptions(&self) -> usize {
        lock(&self.directory).values().sum()
    }

    /// Topics with at least one subscriber in this process.
    pub fn topics(&self) -> usize {
        lock(&self.directory).len()
    }
}

/// The pubsub (and broker) counters at scrape time, as the `pubsub_*` and `broker_*`
/// families (`ringsocket_…` under the registry's prefix).
impl Collector for Hub {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        let m = &self.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, value) in [
            (
                "pubsub_published",
                "Messages published in this process.",
                &m.published,
            ),
            (
                "pubsub_delivered",
                "Messages queued to subscribers (one per subscriber).",
                &m.delivered,
            ),
            (
                "pubsub_inbox_dropped",
                "Publishes dropped for a core because its inbox was full.",
                &m.inbox_dropped,
            ),
            (
                "pubsub_conflated",
                "Messages superseded by a newer value of their key (conflated topics).",
                &m.conflated,
            ),
            (
                "pubsub_conflation_early_flushes",
                "Conflation windows delivered before their end because they held too many keys or bytes.",
                &m.conflation_early_flushes,
            ),
            (
                "pubsub_conflation_dropped",
                "Conflated values dropped for lagging subscribers holding too many keys or bytes.",
                &m.conflation_dropped,
            ),
            (
                "pubsub_from_broker",
                "Messages received from other processes.",
                &m.from_broker,
            ),
        ] {
            counter(e, name, help, load(value))?;
        }
        family(
            e,
            "v1_recoveries",
            "ringsocket.v1 subscriptions with since: recovered (every missed publication sent) or not (history lost or too short).",
            MetricType::Counter,
            "result",
            vec![
                ("recovered".to_owned(), load(&m.recovered)),
                ("not_recovered".to_owned(), load(&m.not_recovered)),
            ],
        )?;
        gauge(
            e,
            "history_bytes",
            "Bytes of publications kept for recovery, over every topic (bounded by history_memory_limit).",
            self.history.bytes() as u64,
        )?;
        gauge(
            e,
            "history_topics",
            "Topics with offsets and an epoch in this process's history.",
            self.history.topics() as u64,
        )?;
        counter(
            e,
            "history_evictions",
            "Topics that lost their kept publications to history_memory_limit.",
            load(&self.history.evicted),
        )?;
        let rows: Vec<(String, u64)> = lock(&self.directory)
            .iter()
            .map(|(topic, n)| (topic.to_string(), *n as u64))
            .collect();
        gauge(
            e,
            "pubsub_topics",
            "Topics with subscribers in this process.",
            rows.len() as u64,
        )?;
        family(
            e,
            "pubsub_subscribers",
            "Subscribers per topic in this process (the metrics_topics topics with the most, the rest summed under topic _other).",
            MetricType::Gauge,
            "topic",
            bounded_topics(rows, self.metrics_topics()),
        )?;
        if let Some(broker) = self.broker.get() {
            broker.metrics().encode(e)?;
        }
        Ok(())
    }
}

/// A handle to publish from anywhere: HTTP handlers, background jobs, other threads.
/// Cloneable and `Send`; publishing never blocks.
#[derive(Clone, Debug)]
pub struct Publisher {
    hub: Arc<Hub>,
}

impl Publisher {
    /// A publisher into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    /// The hub it publishes into.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Publishes `message` to every subscriber of `topic`, in every process.
    pub fn publish(&self, topic: &str, message: Message) -> Result<(), PublishError> {
        self.publish_keyed(topic, Bytes::new(), message)
    }

    /// Publishes a text message.
    pub fn publish_text(
        &self,
        topic: &str,
        text: impl Into<crate::proto::Utf8Bytes>,
    ) -> Result<(), PublishError> {
        self.publish(topic, Message::Text(text.into()))
    }

    /// Publishes a binary message.
    pub fn publish_binary(&self, topic: &str, bytes: impl Into<Bytes>) -> Result<(), PublishError> {
        self.publish(topic, Message::Binary(bytes.into()))
    }

    /// Publishes with a conflation key (used only on conflated topics: the latest
    /// message per key wins within the window).
    pub fn publish_keyed(
        &self,
        topic: &str,
        key: Bytes,
        message: Message,
    ) -> Result<(), PublishError> {
        self.publish_at(topic, key, &message).map(|_| ())
    }

    /// Publishes like [`Publisher::publish_keyed`] and returns the publication's
    /// position in the topic (its offset and epoch), when this process numbers it
    /// (`None` with a numbering broker, which gives the offset later).
    pub fn publish_at(
        &self,
        topic: &str,
        key: Bytes,
        message: &Message,
    ) -> Result<Option<Position>, PublishError> {
        if !valid_topic(topic) {
            return Err(PublishError::BadTopic);
        }
        // The broker first: a publish it refuses is recorded and delivered nowhere.
        self.hub.forward(topic, message, None)?;
        let (sent, position) = self
            .hub
            .record(topic, message, false, key, None, |delivery, _| {
                self.hub.publish(delivery, None)
            });
        sent.map(|()| position)
    }

    /// Subscribers to `topic` in this process.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.hub.subscribers(topic)
    }

    /// The sink a broker delivers other processes' messages to: every core's inbox.
    pub fn broker_sink(&self) -> BrokerSink {
        let hub = Arc::downgrade(&self.hub);
        Arc::new(move |inbound: Inbound| {
            let Some(hub) = hub.upgrade() else {
                return Accepted::Delivered;
            };
            if !valid_topic(&inbound.topic) {
                return Accepted::Delivered;
            }
            let Some(message) = inbound_message(inbound.kind, &inbound.payload) else {
                tracing::debug!(topic = %inbound.topic, "broker text message is not UTF-8: dropped");
                return Accepted::Delivered;
            };
            if !inbound.own {
                hub.metrics.from_broker.fetch_add(1, Ordering::Relaxed);
            }
            if let Some((offset, epoch)) = &inbound.position {
                return hub.record_numbered(
                    &inbound.topic,
                    &message,
                    (*offset, epoch),
                    inbound.own,
                );
            }
            hub.record(
                &inbound.topic,
                &message,
                false,
                Bytes::new(),
                None,
                |delivery, _| {
                    let _ = hub.fan_out(delivery, None);
                },
            );
            Accepted::Delivered
        })
    }
}

/// The message an [`Inbound`] carries; `None` for a text that is not UTF-8 (never
/// from our envelopes, which the broker checks).
fn inbound_message(kind: Kind, payload: &Bytes) -> Option<Message> {
    Some(match kind {
        Kind::Text => Message::Text(crate::proto::Utf8Bytes::try_from(payload.clone()).ok()?),
        Kind::Binary => Message::Binary(payload.clone()),
    })
}

/// A numbering broker's kept publications as `(offset, data, base64)`, as a topic's
/// log keeps them.
pub(crate) fn snapshot_data(snapshot: &Snapshot) -> Vec<(u64, Vec<u8>, bool)> {
    snapshot
        .entries
        .iter()
        .filter_map(|e| {
            let (offset, _) = e.position.as_ref()?;
            let message = inbound_message(e.kind, &e.payload)?;
            let (data, base64) = history::data_of(&message, false);
            Some((*offset, data.into_owned(), base64))
        })
        .collect()
}

/// A publication's delivery with both its sides.
fn both_sides(
    topic: &str,
    frame: Bytes,
    key: Bytes,
    exclude: Option<(usize, SessionId)>,
    recorded: &Recorded,
    raw: bool,
) -> Arc<Delivery> {
    let v1 = V1Side {
        delivery: Delivery {
            topic: recorded.v1_name.clone(),
            frame: recorded.frame.clone(),
            key: key.clone(),
            exclude,
            v1: None,
            raw: true,
        },
        offset: recorded.offset,
        delivered: recorded.delivered.clone(),
        queued: recorded.queued.clone(),
    };
    Arc::new(Delivery {
        topic: topic.into(),
        frame,
        key,
        exclude,
        v1: Some(Box::new(v1)),
        raw,
    })
}

/// Frames a data message once, for every subscriber.
pub(crate) fn encode_message(message: &Message) -> Bytes {
    match message {
        Message::Text(text) => encode_server_frame(OpCode::Text, text.as_bytes()),
        Message::Binary(bytes) => encode_server_frame(OpCode::Binary, bytes),
    }
}

/// The kind and payload of a message, as the broker carries it (no copy).
fn broker_payload(message: &Message) -> (Kind, Bytes) {
    match message {
        Message::Text(text) => (Kind::Text, text.as_bytes().clone()),
        Message::Binary(bytes) => (Kind::Binary, bytes.clone()),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data under these locks stays consistent at every step; a panic elsewhere
    // while holding one must not take pubsub down with it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
