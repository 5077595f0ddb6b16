//! What the subscribers of every broker do the same way: hand a message to the sink
//! (surviving its panic), count and log gap fills and messages that are not ours.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;

use super::backlog::RateLimit;
use super::{Accepted, BrokerMetrics, BrokerName, BrokerSink, Inbound};

/// Calls the sink, which is the pubsub layer's: should it panic on `inbound` (of
/// `topic`), the line is logged and the subscriber carries on.
pub(crate) fn deliver(
    broker: BrokerName,
    sink: &BrokerSink,
    topic: &str,
    inbound: Inbound,
) -> Option<Accepted> {
    match catch_unwind(AssertUnwindSafe(|| sink(inbound))) {
        Ok(accepted) => Some(accepted),
        Err(_) => {
            tracing::error!(
                topic,
                "{broker} broker: the sink panicked on a message; dropped"
            );
            None
        }
    }
}

/// Counts and logs how a gap fill of `topic`'s offsets `after + 1 ..= upto` went, and
/// returns the entries to hand over (none when they could not be read).
pub(crate) fn gap_fill(
    broker: BrokerName,
    metrics: &BrokerMetrics,
    topic: &str,
    (after, upto): (u64, u64),
    filled: Result<Vec<Inbound>, String>,
) -> Vec<Inbound> {
    match filled {
        Ok(entries) => {
            let n = entries.len() as u64;
            metrics.gap_fills.fetch_add(1, Ordering::Relaxed);
            metrics.gap_filled.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(
                topic = %topic,
                after,
                upto,
                found = n,
                "{broker} broker: offsets missing before a publication, filled from the stream"
            );
            entries
        }
        Err(e) => {
            tracing::warn!(
                topic = %topic,
                "{broker} broker: offsets {} to {} are missing here and could not be read from the stream: {e}",
                after + 1,
                upto
            );
            Vec::new()
        }
    }
}

/// Counts a dropped message that is not ours, received on `at` (a NATS subject, a
/// Redis channel), and logs it (at most one line a second).
pub(crate) fn malformed(
    broker: BrokerName,
    metrics: &BrokerMetrics,
    log: &RateLimit,
    at: &str,
    cause: &dyn fmt::Display,
) {
    metrics.malformed.fetch_add(1, Ordering::Relaxed);
    let Some(suppressed) = log.check() else {
        return;
    };
    // The same line, with each broker's own word for where and what.
    match broker {
        BrokerName::Nats => tracing::warn!(
            subject = at,
            "NATS broker: dropped a message that is not a ringsocket publication: {cause} \
             ({suppressed} more since the last such line)"
        ),
        BrokerName::Redis => tracing::warn!(
            channel = at,
            "Redis broker: dropped a message that is not a ringsocket envelope: {cause} \
             ({suppressed} more since the last such line)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(offset: u64) -> Inbound {
        Inbound {
            topic: "t".into(),
            kind: super::super::Kind::Text,
            payload: bytes::Bytes::from_static(b"x"),
            position: Some((offset, "e".into())),
            own: false,
        }
    }

    #[test]
    fn a_panicking_sink_is_survived() {
        let sink: BrokerSink = std::sync::Arc::new(|inbound: Inbound| {
            assert!(inbound.position.is_none(), "refused");
            Accepted::Delivered
        });
        assert_eq!(
            deliver(
                BrokerName::Nats,
                &sink,
                "t",
                Inbound::new("t", super::super::Kind::Text, bytes::Bytes::new())
            ),
            Some(Accepted::Delivered)
        );
        assert_eq!(deliver(BrokerName::Redis, &sink, "t", inbound(1)), None);
    }

    #[test]
    fn a_gap_fill_counts_what_it_found_and_nothing_when_it_fails() {
        let metrics = BrokerMetrics::default();
        let found = gap_fill(
            BrokerName::Nats,
            &metrics,
            "t",
            (1, 3),
            Ok(vec![inbound(2), inbound(3)]),
        );
        assert_eq!(found, [inbound(2), inbound(3)]);
        let none = gap_fill(BrokerName::Redis, &metrics, "t", (1, 3), Err("down".into()));
        assert!(none.is_empty());
        assert_eq!(metrics.gap_fills.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.gap_filled.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn every_malformed_message_is_counted_however_few_are_logged() {
        let metrics = BrokerMetrics::default();
        let log = RateLimit::new();
        for broker in [BrokerName::Nats, BrokerName::Redis] {
            malformed(broker, &metrics, &log, "x", &"bad");
        }
        assert_eq!(metrics.malformed.load(Ordering::Relaxed), 2);
    }
}
