//! The subscriber thread: one Redis connection in Pub/Sub mode, for the whole process.

use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use redis::{Msg, PubSub, RedisResult};

use super::envelope::{self, Origin};
use super::history;
use super::{Link, LinkState, POLL_INTERVAL, RateLimit, Shared, lock, wait_unless_stopped};
use crate::broker::{Accepted, Inbound};

/// Channels per `SUBSCRIBE` / `UNSUBSCRIBE` command when many change at once.
const CHANNELS_PER_COMMAND: usize = 512;

/// Other processes whose last sequence number is remembered. Past it the memory starts
/// over (a process gets a new origin at each start, so old ones pile up): the only
/// cost is that a duplicate arriving right then is not recognised.
const MAX_ORIGINS: usize = 1024;

/// Runs until the broker stops: connect, subscribe to every wanted topic, receive;
/// on a loss, reconnect with backoff and start over.
pub(super) fn run(shared: &Shared, stop: &Receiver<()>, reads: &Sender<history::Read>) {
    let mut link = LinkState::new(Link::Subscriber, shared);
    let mut listener = Listener {
        shared,
        malformed_log: RateLimit::new(),
        oversized_log: RateLimit::new(),
        seen: Seen::default(),
        reads,
    };
    while let Some(mut con) = shared.connect(&mut link, |d| wait_unless_stopped(stop, d)) {
        let result = listener.session(&mut con, &mut link);
        shared.metrics.subscriptions.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => break,
            Err(e) => link.lost(shared, &e),
        }
    }
    link.closed(shared);
}

/// The subscriber's state that outlives one connection.
struct Listener<'a> {
    shared: &'a Shared,
    malformed_log: RateLimit,
    oversized_log: RateLimit,
    seen: Seen,
    /// The history reader's questions (gap fills).
    reads: &'a Sender<history::Read>,
}

/// The highest sequence number received from each other process, to drop what a
/// process sends again after its connection broke mid-batch (see the publisher).
///
/// Redis passes each connection's commands on in the order it executes them, and a
/// process sends its messages in sequence order, resending an unacknowledged batch
/// from its start before anything newer: so a number at or below the highest seen is
/// one received already.
#[derive(Default)]
struct Seen {
    highest: HashMap<Origin, u64>,
}

impl Seen {
    /// Whether message `seq` of `origin` is new (and remembers it).
    fn fresh(&mut self, origin: Origin, seq: u64) -> bool {
        if let Some(highest) = self.highest.get_mut(&origin) {
            if seq <= *highest {
                return false;
            }
            *highest = seq;
            return true;
        }
        if self.highest.len() >= MAX_ORIGINS {
            self.highest.clear();
        }
        self.highest.insert(origin, seq);
        true
    }
}

impl Listener<'_> {
    /// One connection's life. `Ok` when the broker stops, `Err` when the connection is
    /// lost.
    fn session(&mut self, con: &mut redis::Connection, link: &mut LinkState) -> RedisResult<()> {
        let shared = self.shared;
        let mut pubsub = con.as_pubsub();
        // Channels subscribed on this connection, by topic.
        let mut subscribed = HashSet::new();
        shared.wanted_changed.store(false, Ordering::Release);
        self.sync(&mut pubsub, &mut subscribed)?;
        link.connected(shared);
        pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
        let idle_polls_per_ping =
            (shared.config.health_interval.as_nanos() / POLL_INTERVAL.as_nanos()).max(1);
        let mut idle_polls = 0;
        loop {
            if shared.stopping() {
                return Ok(());
            }
            // A plain load first: this runs once per message.
            if shared.wanted_changed.load(Ordering::Relaxed)
                && shared.wanted_changed.swap(false, Ordering::AcqRel)
            {
                pubsub.set_read_timeout(Some(shared.config.io_timeout))?;
                self.sync(&mut pubsub, &mut subscribed)?;
                pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    idle_polls = 0;
                    self.deliver(&msg, &subscribed);
                }
                Err(e) if e.is_timeout() => {
                    idle_polls += 1;
                    if idle_polls >= idle_polls_per_ping {
                        idle_polls = 0;
                        pubsub.set_read_timeout(Some(shared.config.io_timeout))?;
                        pubsub.ping::<redis::Value>()?;
                        pubsub.set_read_timeout(Some(POLL_INTERVAL))?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Brings this connection's subscriptions in line with the wanted topics.
    fn sync(&self, pubsub: &mut PubSub<'_>, subscribed: &mut HashSet<String>) -> RedisResult<()> {
        let shared = self.shared;
        let (add, remove): (Vec<String>, Vec<String>) = {
            let wanted = lock(&shared.wanted);
            (
                wanted
                    .iter()
                    .filter(|t| !subscribed.contains(*t))
                    .cloned()
                    .collect(),
                subscribed
                    .iter()
                    .filter(|t| !wanted.contains(*t))
                    .cloned()
                    .collect(),
            )
        };
        let channels = |topics: &[String]| -> Vec<String> {
            topics
                .iter()
                .map(|t| {
                    let mut channel = String::new();
                    shared.channel_into(t, &mut channel);
                    channel
                })
                .collect()
        };
        for topics in add.chunks(CHANNELS_PER_COMMAND) {
            pubsub.subscribe(channels(topics))?;
            subscribed.extend(topics.iter().cloned());
        }
        // Never an empty UNSUBSCRIBE: that would drop every subscription.
        for topics in remove.chunks(CHANNELS_PER_COMMAND) {
            pubsub.unsubscribe(channels(topics))?;
            for topic in topics {
                subscribed.remove(topic);
            }
        }
        shared
            .metrics
            .subscriptions
            .store(subscribed.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Hands a message from another process to the sink; drops our own and late ones,
    /// counts what is not our envelope.
    fn deliver(&mut self, msg: &Msg, subscribed: &HashSet<String>) {
        let shared = self.shared;
        let channel = msg.get_channel_name();
        let Some(topic) = channel.strip_prefix(shared.config.prefix.as_str()) else {
            self.malformed(channel, "channel without our prefix");
            return;
        };
        if !subscribed.contains(topic) {
            // Sent before our UNSUBSCRIBE took effect: nobody here wants it any more.
            return;
        }
        let bytes = msg.get_payload_bytes();
        let (position, bytes) = match envelope::split_position(bytes) {
            Ok(split) => split,
            Err(e) => {
                self.malformed(channel, e);
                return;
            }
        };
        let mut own = false;
        if let Some((origin, size)) = envelope::peek(bytes) {
            // Our own publication comes back only when Redis numbered it: its
            // ringsocket.v1 side is delivered here with that number.
            own = origin == shared.origin;
            if own && position.is_none() {
                return;
            }
            // Our own (numbered) publications are not what a client sent us.
            if !own && size > shared.config.max_payload {
                // Checked before decoding: a huge text payload is not validated for
                // nothing.
                self.oversized(channel, size);
                return;
            }
        }
        let envelope = match envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(e) => {
                self.malformed(channel, e);
                return;
            }
        };
        if let Some(seq) = envelope.seq {
            if !own && !self.seen.fresh(envelope.origin, seq) {
                shared.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !own {
            shared.metrics.received.fetch_add(1, Ordering::Relaxed);
        }
        let inbound = Inbound {
            topic: topic.to_owned(),
            kind: envelope.kind,
            payload: Bytes::copy_from_slice(envelope.payload),
            position: position.map(|(offset, epoch)| (offset, epoch.into())),
            own,
        };
        self.hand_over(topic, inbound);
    }

    /// Hands `inbound` to the sink; when the sink finds offsets missing before it,
    /// fetches them from the topic's stream first (through the history reader), hands
    /// them over in order, then `inbound` again.
    fn hand_over(&mut self, topic: &str, inbound: Inbound) {
        let shared = self.shared;
        // Only a numbered publication can show a gap: only it is kept for a second try.
        let Some(again) = inbound.position.is_some().then(|| inbound.clone()) else {
            let _ = self.sink(topic, inbound);
            return;
        };
        let Some(Accepted::Gap { after }) = self.sink(topic, inbound) else {
            return;
        };
        let inbound = again;
        let Some(offset) = inbound.position.as_ref().map(|(offset, _)| *offset) else {
            return;
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let read = history::Read {
            topic: inbound.topic.clone(),
            after,
            upto: Some(offset - 1),
            limit: usize::try_from(offset - 1 - after).unwrap_or(usize::MAX),
            reply: Box::new(move |result| {
                let _ = tx.send(result);
            }),
        };
        let filled = match self.reads.try_send(read) {
            Ok(()) => rx
                .recv_timeout(shared.config.io_timeout * 2)
                .map_err(|e| e.to_string())
                .and_then(|r| r),
            Err(_) => Err("the history reader is busy or stopped".to_owned()),
        };
        match filled {
            Ok(snapshot) => {
                let n = snapshot.entries.len() as u64;
                shared.metrics.gap_fills.fetch_add(1, Ordering::Relaxed);
                shared.metrics.gap_filled.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(
                    topic = %inbound.topic,
                    after,
                    upto = offset - 1,
                    found = n,
                    "Redis broker: offsets missing before a publication, filled from the stream"
                );
                for entry in snapshot.entries {
                    let _ = self.sink(topic, entry);
                }
            }
            Err(e) => {
                tracing::warn!(
                    topic = %inbound.topic,
                    "Redis broker: offsets {} to {} are missing here and could not be read from the stream: {e}",
                    after + 1,
                    offset - 1
                );
            }
        }
        // Taken now, whatever is still missing.
        let _ = self.sink(topic, inbound);
    }

    /// Calls the sink, which is the pubsub layer's: should it panic, this thread
    /// carries on.
    fn sink(&self, topic: &str, inbound: Inbound) -> Option<Accepted> {
        match catch_unwind(AssertUnwindSafe(|| (self.shared.sink)(inbound))) {
            Ok(accepted) => Some(accepted),
            Err(_) => {
                tracing::error!(
                    topic,
                    "Redis broker: the sink panicked on a message; dropped"
                );
                None
            }
        }
    }

    fn oversized(&self, channel: &str, size: usize) {
        self.shared
            .metrics
            .oversized
            .fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.oversized_log.check() {
            tracing::warn!(
                channel,
                size,
                max_payload = self.shared.config.max_payload,
                "Redis broker: dropped a message larger than max_message_size \
                 ({suppressed} more since the last such line)"
            );
        }
    }

    fn malformed(&self, channel: &str, cause: impl std::fmt::Display) {
        self.shared
            .metrics
            .malformed
            .fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.malformed_log.check() {
            tracing::warn!(
                channel,
                "Redis broker: dropped a message that is not a ringsocket envelope: {cause} \
                 ({suppressed} more since the last such line)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_at_or_below_the_highest_seen_is_a_duplicate() {
        let mut seen = Seen::default();
        let (a, b) = ([1; 16], [2; 16]);
        assert!(seen.fresh(a, 1));
        assert!(seen.fresh(a, 2));
        // Gaps are messages of topics this process does not listen to.
        assert!(seen.fresh(a, 10));
        // Each origin counts on its own.
        assert!(seen.fresh(b, 3));
        // A batch resent from 2: all but the new ones are dropped, in order.
        for seq in [2, 3, 9, 10] {
            assert!(!seen.fresh(a, seq), "{seq}");
        }
        assert!(seen.fresh(a, 11));
        assert!(!seen.fresh(b, 3));
    }

    #[test]
    fn the_memory_of_origins_is_bounded() {
        let mut seen = Seen::default();
        for i in 0..MAX_ORIGINS + 10 {
            let mut origin = [0; 16];
            origin[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(seen.fresh(origin, 5));
        }
        assert!(seen.highest.len() <= MAX_ORIGINS);
    }
}
