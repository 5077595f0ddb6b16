//! The bounded **backlog** every broker keeps: messages [`Broker::publish`] took and
//! the broker has not had acknowledged yet (queued, being sent, or waiting for the
//! broker to come back), bounded in messages and in payload bytes.
//!
//! Shared by the Redis and NATS brokers, so that both count, refuse and log alike:
//! a publish that does not fit is refused before anyone gets it
//! ([`Refused::BacklogFull`]), counted in `ringsocket_broker_backlog_full_total` (and
//! `..._publish_failed_total`) and logged at most once a second with the cause (the
//! broker unreachable, or not keeping up). `ringsocket_broker_backlog_messages` and
//! `..._backlog_bytes` show how full it is.
//!
//! [`Broker::publish`]: super::Broker::publish

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;

use super::{Ack, BrokerMetrics, Kind, Refused};

/// A message waiting to be forwarded.
pub(crate) struct Outbound {
    pub(crate) topic: Box<str>,
    pub(crate) kind: Kind,
    pub(crate) payload: Bytes,
    /// Told the offset and epoch the broker gave it (a numbering broker).
    pub(crate) ack: Option<Ack>,
    /// Its sequence number, given when the publisher takes it (0 until then), for a
    /// broker that numbers resends itself (Redis; NATS uses `Nats-Msg-Id`).
    pub(crate) seq: u64,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound")
            .field("topic", &self.topic)
            .field("kind", &self.kind)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    /// Tells the ack, if any, that no offset will come.
    pub(crate) fn unacked(self) {
        if let Some(ack) = self.ack {
            ack(None);
        }
    }
}

/// Why the broker's queue did not take a message the backlog had room for.
pub(crate) enum QueueFailed {
    /// The queue is full (never while the reservation holds, if the queue has room
    /// for the whole backlog).
    Full(Outbound),
    /// The broker's threads are gone.
    Closed(Outbound),
}

/// The backlog's bounds and its "full" log line.
pub(crate) struct Backlog {
    /// "Redis", "NATS": named in the log lines.
    broker: &'static str,
    max_messages: usize,
    max_bytes: usize,
    full_log: RateLimit,
}

impl Backlog {
    pub(crate) fn new(broker: &'static str, max_messages: usize, max_bytes: usize) -> Self {
        Self {
            broker,
            max_messages,
            max_bytes,
            full_log: RateLimit::new(),
        }
    }

    /// Takes a publication into the backlog (room first, then `queue` it), with its
    /// ack if any; refuses it, keeping nothing, when it does not fit or the broker
    /// stopped. `reachable` says whether the broker is connected, for the log line.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take(
        &self,
        metrics: &BrokerMetrics,
        stopping: bool,
        (topic, kind, payload): (&str, Kind, Bytes),
        ack: Option<Ack>,
        queue: impl FnOnce(Outbound) -> Result<(), QueueFailed>,
        reachable: impl Fn() -> bool,
        addr: &str,
    ) -> Result<(), Refused> {
        if stopping {
            Self::failed(metrics, 1);
            if let Some(ack) = ack {
                ack(None);
            }
            return Err(Refused::Stopped);
        }
        let size = payload.len() as u64;
        if !self.reserve(metrics, size) {
            self.refused(metrics, reachable(), addr);
            if let Some(ack) = ack {
                ack(None);
            }
            return Err(Refused::BacklogFull);
        }
        let message = Outbound {
            topic: topic.into(),
            kind,
            payload,
            ack,
            seq: 0,
        };
        match queue(message) {
            Ok(()) => Ok(()),
            Err(QueueFailed::Full(message)) => {
                message.unacked();
                Self::release(metrics, 1, size);
                self.refused(metrics, reachable(), addr);
                Err(Refused::BacklogFull)
            }
            Err(QueueFailed::Closed(message)) => {
                message.unacked();
                Self::release(metrics, 1, size);
                Self::failed(metrics, 1);
                Err(Refused::Stopped)
            }
        }
    }

    /// Counts `n` messages that could not be forwarded.
    pub(crate) fn failed(metrics: &BrokerMetrics, n: u64) {
        metrics.publish_failed.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes room for one message of `size` payload bytes; false (and nothing taken)
    /// when it does not fit. Never more than the bounds, even with many cores
    /// publishing at once.
    pub(crate) fn reserve(&self, metrics: &BrokerMetrics, size: u64) -> bool {
        let max_messages = self.max_messages as u64;
        let max_bytes = self.max_bytes as u64;
        let took_message = metrics
            .backlog_messages
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max_messages).then_some(n + 1)
            })
            .is_ok();
        if !took_message {
            return false;
        }
        let took_bytes = metrics
            .backlog_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(size).filter(|&total| total <= max_bytes)
            })
            .is_ok();
        if !took_bytes {
            metrics.backlog_messages.fetch_sub(1, Ordering::Relaxed);
        }
        took_bytes
    }

    /// Gives back the room of `messages` messages of `bytes` payload bytes in all:
    /// acknowledged by the broker, or abandoned at shutdown.
    pub(crate) fn release(metrics: &BrokerMetrics, messages: u64, bytes: u64) {
        metrics
            .backlog_messages
            .fetch_sub(messages, Ordering::Relaxed);
        metrics.backlog_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts a publish refused for a full backlog, and logs it (at most once a
    /// second) with the cause.
    pub(crate) fn refused(&self, metrics: &BrokerMetrics, reachable: bool, addr: &str) {
        Self::failed(metrics, 1);
        metrics.backlog_full.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.full_log.check() {
            let broker = self.broker;
            let cause = if reachable {
                format!("{broker} is not keeping up")
            } else {
                format!("{broker} is unreachable")
            };
            tracing::warn!(
                addr,
                messages = metrics.backlog_messages.load(Ordering::Relaxed),
                bytes = metrics.backlog_bytes.load(Ordering::Relaxed),
                max_messages = self.max_messages,
                max_bytes = self.max_bytes,
                "{broker} broker: backlog full ({cause}): publishes are refused \
                 ({suppressed} more refused since the last such line)"
            );
        }
    }
}

/// Lets one log line through per second, counting the ones it holds back.
pub(crate) struct RateLimit {
    start: Instant,
    /// Milliseconds since `start` before which no line is logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub(crate) fn check(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_lets_one_line_a_second_through_and_counts_the_rest() {
        let limit = RateLimit::new();
        assert_eq!(limit.check(), Some(0));
        assert_eq!(limit.check(), None);
        assert_eq!(limit.check(), None);
        limit.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limit.check(), Some(2));
    }

    #[test]
    fn the_backlog_never_holds_more_than_its_bounds() {
        let metrics = BrokerMetrics::default();
        let backlog = Backlog::new("Test", 2, 10);
        assert!(backlog.reserve(&metrics, 6));
        assert!(!backlog.reserve(&metrics, 5), "bytes over the bound");
        assert!(backlog.reserve(&metrics, 4));
        assert!(!backlog.reserve(&metrics, 0), "messages over the bound");
        assert_eq!(metrics.backlog_messages.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 10);
        Backlog::release(&metrics, 2, 10);
        assert_eq!(metrics.backlog_messages.load(Ordering::Relaxed), 0);
        let refused = backlog.take(
            &metrics,
            false,
            ("t", Kind::Text, Bytes::from_static(b"12345678901")),
            None,
            |_| Ok(()),
            || true,
            "x",
        );
        assert_eq!(refused, Err(Refused::BacklogFull));
        assert_eq!(metrics.backlog_full.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.publish_failed.load(Ordering::Relaxed), 1);
        let closed = backlog.take(
            &metrics,
            false,
            ("t", Kind::Text, Bytes::from_static(b"1")),
            None,
            |m| Err(QueueFailed::Closed(m)),
            || true,
            "x",
        );
        assert_eq!(closed, Err(Refused::Stopped));
        assert_eq!(metrics.backlog_messages.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.backlog_bytes.load(Ordering::Relaxed), 0);
    }
}
