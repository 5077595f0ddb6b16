//! Brokers: how a message published on one process reaches the subscribers of every
//! other process.
//!
//! The in-process fan-out (every core of this process) is the `pubsub` layer's job and
//! needs no broker: that is the embedded default. A [`Broker`] only carries messages
//! *between* processes: over Redis Pub/Sub ([`redis`]) or NATS with JetStream
//! ([`nats`]).
//!
//! Contract, for every implementation:
//! - [`Broker::publish`] forwards a message published on this process to the other
//!   processes. It never blocks the calling I/O core: it takes the message into the
//!   broker's bounded **backlog** and returns. When the backlog is full it refuses
//!   ([`Refused::BacklogFull`]) and keeps nothing: the caller then delivers the
//!   message nowhere, not even locally, and tells its own caller (`POST /publish`
//!   answers 503), so every answer is truthful. The pubsub layer therefore calls it
//!   *before* it delivers a publish to this process's subscribers.
//! - Messages from other processes are handed to the [`BrokerSink`] given at start,
//!   which delivers them to this process's cores. A process never receives back what
//!   it published itself (it delivered those locally already): exactly once.
//! - [`Broker::subscribe`] / [`Broker::unsubscribe`] are called by the pubsub layer
//!   when this process gains its first local subscriber to a topic and loses its last:
//!   a process listens to a topic only while someone here wants it.
//! - A broker that loses its connection keeps local delivery running; it keeps what
//!   is published meanwhile in its backlog, reconnects, resubscribes, and then
//!   forwards the backlog in publish order. What it cannot forward (refused while the
//!   backlog is full, or still in it at shutdown) is counted in [`BrokerMetrics`].

mod backlog;
mod envelope;
mod error;
pub mod nats;
pub mod redis;
mod report;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{counter, gauge};

pub use error::{BrokerError, BrokerName};

/// The kind of a data message carried between processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A text message (valid UTF-8).
    Text,
    /// A binary message.
    Binary,
}

/// A message received from another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The topic, without any broker prefix.
    pub topic: String,
    /// Text or binary.
    pub kind: Kind,
    /// The message payload.
    pub payload: Bytes,
    /// Its offset and epoch in the topic, from a broker that numbers publications
    /// ([`Broker::sequences`]); `None` otherwise.
    pub position: Option<(u64, Arc<str>)>,
    /// Published by this process (a numbering broker hands a process its own
    /// publications back, with their offsets; the raw side was delivered already).
    pub own: bool,
}

impl Inbound {
    /// A message of another process with no position.
    pub fn new(topic: impl Into<String>, kind: Kind, payload: Bytes) -> Self {
        Self {
            topic: topic.into(),
            kind,
            payload,
            position: None,
            own: false,
        }
    }
}

/// What the sink made of an [`Inbound`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Accepted {
    /// Delivered (or dropped as one seen already).
    Delivered,
    /// Not delivered: its offset is above the next one expected, the last one this
    /// process has being `after`. The broker fetches the missing ones from the
    /// topic's history, hands them over in order, then this one again with
    /// [`Inbound::position`] as it was (the sink then takes it whatever is missing).
    Gap {
        /// The last offset this process has of the topic.
        after: u64,
    },
}

/// Where a broker delivers messages from other processes. Called on the broker's own
/// thread; it must not block for long (the pubsub layer only queues into core inboxes).
pub type BrokerSink = Arc<dyn Fn(Inbound) -> Accepted + Send + Sync>;

/// Called once with the offset and epoch a numbering broker gave a publication, or
/// `None` when it cannot say (the broker stopped first, or the publication was sent
/// again after a broken connection and numbered the first time).
pub type Ack = Box<dyn FnOnce(Option<(u64, Arc<str>)>) + Send>;

/// A topic's position and kept publications, read from a numbering broker for a
/// `ringsocket.v1` subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The topic's epoch.
    pub epoch: Arc<str>,
    /// Its last offset (0: none yet).
    pub top: u64,
    /// Kept publications after the asked offset, oldest first, each with its
    /// position.
    pub entries: Vec<Inbound>,
}

/// Called once, on a broker thread, with what [`Broker::history`] read.
pub type HistoryReply = Box<dyn FnOnce(Result<Snapshot, String>) + Send>;

/// Why [`Broker::publish`] did not take a message. Either way the broker keeps
/// nothing of it, and the publish must be delivered nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The backlog (messages not yet handed to the other processes) is at its bound,
    /// in messages or in bytes: the broker has been away, or too slow, for a while.
    /// Retry later.
    BacklogFull,
    /// The broker was shut down.
    Stopped,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BacklogFull => f.write_str("the broker's backlog is full"),
            Self::Stopped => f.write_str("the broker is shut down"),
        }
    }
}

impl std::error::Error for Refused {}

/// Carries messages between processes. See the module docs for the contract.
pub trait Broker: Send + Sync + fmt::Debug {
    /// Takes a message published on this process into the backlog, to be forwarded to
    /// the other processes; refuses it, keeping nothing, when the backlog is full.
    /// Never blocks.
    fn publish(&self, topic: &str, kind: Kind, payload: Bytes) -> Result<(), Refused>;
    /// Whether this broker numbers each topic's publications itself, with offsets and
    /// an epoch shared by every process, and keeps their history (docs/protocol.md):
    /// then a publish's `ringsocket.v1` side reaches this process's subscribers when
    /// it comes back from the broker, numbered. Default: no.
    fn sequences(&self) -> bool {
        false
    }

    /// Like [`Broker::publish`], and `ack` gets the offset and epoch the broker gave
    /// the publication. Default: publishes and acks with `None`.
    fn publish_acked(
        &self,
        topic: &str,
        kind: Kind,
        payload: Bytes,
        ack: Ack,
    ) -> Result<(), Refused> {
        let result = self.publish(topic, kind, payload);
        ack(None);
        result
    }

    /// Reads `topic`'s epoch, last offset and the kept publications after `since` (at
    /// most `limit`), and calls `reply` with them on a broker thread. Default: an
    /// error (this broker keeps no history).
    fn history(&self, topic: &str, since: u64, limit: usize, reply: HistoryReply) {
        let _ = (topic, since, limit);
        reply(Err("this broker keeps no history".into()));
    }

    /// This process now has local subscribers to `topic`.
    fn subscribe(&self, topic: &str);
    /// This process no longer has local subscribers to `topic`.
    fn unsubscribe(&self, topic: &str);
    /// The broker's counters, for `/metrics`.
    fn metrics(&self) -> &BrokerMetrics;
    /// Stops the broker's threads; messages still in the backlog are counted as failed.
    fn shutdown(&self);
}

/// A broker's counters. Written by the broker's threads, read by `/metrics`.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// 1 while connected to the broker, else 0.
    pub connected: AtomicU64,
    /// Successful (re)connections after a loss.
    pub reconnects: AtomicU64,
    /// Connection losses and failed attempts.
    pub connection_errors: AtomicU64,
    /// Messages forwarded to other processes.
    pub published: AtomicU64,
    /// Messages published here that never reached the broker: refused because the
    /// backlog was full (also counted in [`BrokerMetrics::backlog_full`]), or still in
    /// the backlog at shutdown.
    pub publish_failed: AtomicU64,
    /// Publishes refused because the backlog was full (the caller was told).
    pub backlog_full: AtomicU64,
    /// Messages in the backlog now: taken by [`Broker::publish`], not yet acknowledged
    /// by the broker (queued, being sent, or waiting for the broker to come back).
    pub backlog_messages: AtomicU64,
    /// Payload bytes of the messages in the backlog now.
    pub backlog_bytes: AtomicU64,
    /// Messages received from other processes.
    pub received: AtomicU64,
    /// Messages received that could not be decoded (not our envelope).
    pub malformed: AtomicU64,
    /// Messages received a second time and dropped: a batch the other process sent
    /// again after its connection broke, which the broker had partly passed on.
    pub duplicates: AtomicU64,
    /// Times offsets were missing before a numbered publication and were read from
    /// the topic's history at the broker.
    pub gap_fills: AtomicU64,
    /// Publications read from the broker's history to fill those gaps.
    pub gap_filled: AtomicU64,
    /// Messages received whose payload was over the size limit, dropped.
    pub oversized: AtomicU64,
    /// Topics this process is subscribed to at the broker.
    pub subscriptions: AtomicU64,
    /// Times a clustered broker read which node serves what (Redis Cluster: the slot
    /// map, at start, after a redirect or a lost node, and every health interval).
    pub topology_refreshes: AtomicU64,
    /// Commands a clustered broker's node sent elsewhere (`MOVED`, `ASK`) or asked to
    /// retry (`TRYAGAIN`, `CLUSTERDOWN`), retried there.
    pub redirects: AtomicU64,
    /// Nodes this process holds a subscriber connection to (Redis Cluster: one per
    /// master; 1 for a single Redis).
    pub shards: AtomicU64,
    /// Error replies to a subscription command (`SUBSCRIBE`, `SSUBSCRIBE`, ...): an ACL
    /// refusal, or a slot that moved (then subscribed again where it is served).
    pub subscribe_errors: AtomicU64,
}

impl BrokerMetrics {
    /// Encodes these counters as the `broker_*` families (`ringsocket_broker_*` under
    /// the registry's prefix).
    pub fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            encoder,
            "broker_connected",
            "1 while connected to the broker.",
            load(&self.connected),
        )?;
        for (name, help, value) in [
            (
                "broker_reconnects",
                "Reconnections to the broker after a loss.",
                &self.reconnects,
            ),
            (
                "broker_connection_errors",
                "Broker connection losses and failed attempts.",
                &self.connection_errors,
            ),
            (
                "broker_published",
                "Messages forwarded to other processes.",
                &self.published,
            ),
            (
                "broker_publish_failed",
                "Messages that could not be forwarded to other processes.",
                &self.publish_failed,
            ),
            (
                "broker_backlog_full",
                "Publishes refused because the broker backlog was full.",
                &self.backlog_full,
            ),
            (
                "broker_received",
                "Messages received from other processes.",
                &self.received,
            ),
            (
                "broker_malformed",
                "Broker messages that were not a ringsocket envelope.",
                &self.malformed,
            ),
            (
                "broker_duplicates",
                "Broker messages received twice (a batch resent after a lost connection) and dropped.",
                &self.duplicates,
            ),
            (
                "broker_gap_fills",
                "Times offsets were missing before a numbered publication and were read from the broker's history.",
                &self.gap_fills,
            ),
            (
                "broker_gap_filled",
                "Publications read from the broker's history to fill gaps.",
                &self.gap_filled,
            ),
            (
                "broker_topology_refreshes",
                "Times the broker's cluster topology (which node serves which slot) was read.",
                &self.topology_refreshes,
            ),
            (
                "broker_redirects",
                "Broker commands redirected (MOVED, ASK) or retried (TRYAGAIN, CLUSTERDOWN) by a cluster node.",
                &self.redirects,
            ),
            (
                "broker_subscribe_errors",
                "Error replies to a broker subscription command (an ACL refusal, a moved slot).",
                &self.subscribe_errors,
            ),
            (
                "broker_oversized",
                "Broker messages dropped because their payload was over max_message_size.",
                &self.oversized,
            ),
        ] {
            counter(encoder, name, help, load(value))?;
        }
        gauge(
            encoder,
            "broker_backlog_messages",
            "Messages published here and not yet acknowledged by the broker.",
            load(&self.backlog_messages),
        )?;
        gauge(
            encoder,
            "broker_backlog_bytes",
            "Payload bytes of the messages in the broker backlog.",
            load(&self.backlog_bytes),
        )?;
        gauge(
            encoder,
            "broker_shards",
            "Broker nodes (Redis Cluster masters) this process holds a subscriber connection to.",
            load(&self.shards),
        )?;
        gauge(
            encoder,
            "broker_subscriptions",
            "Topics subscribed at the broker.",
            load(&self.subscriptions),
        )
    }
}
