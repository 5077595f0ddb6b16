//! The publisher thread: one Redis connection for the whole process, fed by the bounded
//! publish queue, sending everything queued in one pipelined batch per round trip.
//!
//! A message taken out of the queue stays in the current batch until Redis has
//! answered its `PUBLISH`. When a send fails, the batch is kept exactly as it was
//! encoded (same sequence numbers) and sent again, first, once a new connection is up;
//! while Redis is away nothing more is taken out of the queue, so the queue is the
//! backlog, in publish order. See the module docs of [`super`] for the guarantees.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use redis::{RedisResult, Value};

use super::envelope;
use super::history;
use super::{Link, LinkState, Outbound, RateLimit, Shared, wait_unless_stopped};

/// Most messages in one pipelined batch.
const MAX_BATCH_MESSAGES: usize = 4096;
/// A batch is closed once its payloads reach this many bytes.
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Topics whose subscriber count at their last `PUBLISH` is remembered, for the wait
/// after a reconnection; past it the memory starts over.
const MAX_REMEMBERED_TOPICS: usize = 4096;
/// How often the subscriber counts are read while waiting for other processes to
/// resubscribe after a reconnection.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Runs until the broker stops: connect, forward batches; on a loss, keep the batch
/// and the queue as they are until Redis is back.
pub(super) fn run(shared: &Shared, queue: &Receiver<Outbound>, stop: &Receiver<()>) {
    let mut link = LinkState::new(Link::Publisher, shared);
    let mut pipe = redis::pipe();
    // A command Redis answers with an error does not fail the others: its reply says so.
    pipe.ignore_errors();
    let mut sender = Sender {
        shared,
        queue,
        stop,
        batch: Vec::new(),
        batch_bytes: 0,
        next_seq: 1,
        pipe,
        channel: String::new(),
        envelope: Vec::new(),
        receivers: HashMap::new(),
        settle: None,
        refused_log: RateLimit::new(),
        script: None,
        keys: [String::new(), String::new(), String::new()],
        origin_hex: history::origin_hex(&shared.origin),
        rng: super::seeded_rng(&shared.origin),
    };
    let mut after_loss = false;
    while let Some(mut con) = shared.connect(&mut link, |d| wait_unless_stopped(stop, d)) {
        link.connected(shared);
        if after_loss {
            let held = shared.metrics.backlog_messages.load(Ordering::Relaxed);
            if held > 0 {
                tracing::info!(
                    addr = %shared.addr,
                    "Redis broker: forwarding the {held} messages held while Redis was \
                     unreachable, once the other processes have resubscribed"
                );
            }
            let grace = shared.config.backoff_max + shared.config.io_timeout;
            sender.settle = Some(Settle {
                since: Instant::now(),
                until: Instant::now() + grace,
                back: HashSet::new(),
            });
        }
        match sender.session(&mut con) {
            Ok(()) => break,
            Err(e) => {
                link.lost(shared, &e);
                after_loss = true;
                tracing::info!(
                    addr = %shared.addr,
                    max_messages = shared.config.publish_queue,
                    max_bytes = shared.config.publish_queue_bytes,
                    "Redis broker: publishes wait in the backlog until Redis is back; \
                     past its bounds they are refused"
                );
            }
        }
    }
    link.closed(shared);
    sender.abandon();
}

/// The publisher's state that outlives one connection (buffers are reused).
struct Sender<'a> {
    shared: &'a Shared,
    queue: &'a Receiver<Outbound>,
    stop: &'a Receiver<()>,
    /// Taken from the queue, not yet acknowledged by Redis; encoded in `pipe` once
    /// complete. Empty between batches.
    batch: Vec<Outbound>,
    /// Payload bytes in `batch`.
    batch_bytes: usize,
    /// The sequence number of the next message encoded.
    next_seq: u64,
    pipe: redis::Pipeline,
    channel: String,
    envelope: Vec<u8>,
    /// Topic → subscribers Redis counted at its last `PUBLISH` there.
    receivers: HashMap<Box<str>, i64>,
    /// Set after a reconnection: the wait for the other processes to resubscribe.
    settle: Option<Settle>,
    refused_log: RateLimit,
    /// The SHA1 of [`history::PUBLISH_SCRIPT`] on the current connection (with
    /// `RedisConfig::history`).
    script: Option<String>,
    /// The keys of the message being encoded (meta, stream, origin).
    keys: [String; 3],
    /// This process's origin in hex, for its per-topic key.
    origin_hex: String,
    rng: rand_chacha::ChaCha8Rng,
}

/// After a reconnection: until `until`, a batch waits until each of its topics has
/// as many subscribers at Redis as it had before the loss.
struct Settle {
    since: Instant,
    until: Instant,
    /// Topics seen back at their count (they are not asked about again).
    back: HashSet<Box<str>>,
}

impl Sender<'_> {
    /// One connection's life. `Ok` when the broker stops, `Err` when the connection is
    /// lost (the batch in flight is kept, to be sent again first).
    fn session(&mut self, con: &mut redis::Connection) -> RedisResult<()> {
        if self.shared.config.history.is_some() {
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(history::PUBLISH_SCRIPT)
                .query(con)?;
            self.script = Some(sha);
            // A batch encoded for the last connection names the script by its SHA1,
            // the same on every server: it is sent as it is.
        }
        // What the last connection could not send goes first, as it was.
        if !self.batch.is_empty() && !self.send(con)? {
            return Ok(());
        }
        loop {
            select! {
                recv(self.queue) -> message => match message {
                    Ok(message) => self.take(message),
                    Err(_) => return Ok(()),
                },
                recv(self.stop) -> _ => return Ok(()),
                default(self.shared.config.health_interval) => {
                    redis::cmd("PING").exec(con)?;
                    continue;
                }
            }
            while self.batch.len() < MAX_BATCH_MESSAGES && self.batch_bytes < MAX_BATCH_BYTES {
                let Ok(message) = self.queue.try_recv() else {
                    break;
                };
                self.take(message);
            }
            self.encode();
            if !self.send(con)? {
                return Ok(());
            }
        }
    }

    fn take(&mut self, message: Outbound) {
        self.batch_bytes += message.payload.len();
        self.batch.push(message);
    }

    /// Encodes the batch into the pipeline, numbering its messages: a `PUBLISH` each,
    /// or with `RedisConfig::history` an `EVALSHA` of the history script (offset,
    /// epoch, stream entry, `PUBLISH`).
    fn encode(&mut self) {
        let shared = self.shared;
        let prefix = &shared.config.prefix;
        self.pipe.clear();
        // Used only by a topic with no epoch yet: one candidate per batch is enough.
        let epoch = if self.script.is_some() {
            history::new_epoch(&mut self.rng)
        } else {
            String::new()
        };
        for message in &self.batch {
            shared.channel_into(&message.topic, &mut self.channel);
            self.envelope.clear();
            envelope::encode(
                &shared.origin,
                self.next_seq,
                message.kind,
                &message.payload,
                &mut self.envelope,
            );
            match (&self.script, shared.config.history) {
                (Some(sha), Some(h)) => {
                    self.keys = [
                        history::key(prefix, &message.topic, "meta"),
                        history::key(prefix, &message.topic, "stream"),
                        history::origin_key(prefix, &message.topic, &self.origin_hex),
                    ];
                    self.pipe
                        .cmd("EVALSHA")
                        .arg(sha.as_str())
                        .arg(3)
                        .arg(&self.keys[..])
                        .arg(self.channel.as_str())
                        .arg(self.envelope.as_slice())
                        .arg(h.size)
                        .arg(h.ttl.as_millis().max(1) as u64)
                        .arg(epoch.as_str())
                        .arg(history::now_ms())
                        .arg(self.next_seq);
                }
                _ => {
                    self.pipe
                        .cmd("PUBLISH")
                        .arg(self.channel.as_str())
                        .arg(self.envelope.as_slice());
                }
            }
            self.next_seq += 1;
        }
    }

    /// Sends the encoded batch. `Ok(true)` once Redis has answered it (the batch is
    /// done), `Ok(false)` when the broker stops first, `Err` when the connection is
    /// lost: the batch is kept, encoded as it is, for the next connection.
    fn send(&mut self, con: &mut redis::Connection) -> RedisResult<bool> {
        if self.settle.is_some() && !self.wait_for_subscribers(con)? {
            return Ok(false);
        }
        let replies: Vec<Value> = self.pipe.query(con)?;
        let shared = self.shared;
        let mut refused = 0u64;
        let mut error = None;
        for (message, reply) in self.batch.iter_mut().zip(&replies) {
            match reply {
                Value::Int(n) => remember(&mut self.receivers, &message.topic, *n),
                Value::Array(parts) => {
                    // The history script: {offset, epoch, receivers}.
                    let (position, receivers) = numbered(parts);
                    if let Some(n) = receivers {
                        remember(&mut self.receivers, &message.topic, n);
                    }
                    if let Some(ack) = message.ack.take() {
                        ack(position);
                    }
                }
                // Redis answered, with an error (an ACL, say): sending it again would
                // get the same answer.
                other => {
                    refused += 1;
                    error.get_or_insert_with(|| format!("{other:?}"));
                }
            }
        }
        let count = self.batch.len() as u64;
        // Fewer replies than commands would be a protocol error, which `query` reports.
        refused += count.saturating_sub(replies.len() as u64);
        shared
            .metrics
            .published
            .fetch_add(count - refused, Ordering::Relaxed);
        shared.release(count, self.batch_bytes as u64);
        if refused > 0 {
            shared.failed(refused);
            if let Some(suppressed) = self.refused_log.check() {
                tracing::warn!(
                    addr = %shared.addr,
                    "Redis broker: Redis refused {refused} PUBLISH commands: {}; those \
                     messages are dropped ({suppressed} more such lines held back)",
                    error.unwrap_or_default()
                );
            }
        }
        for message in self.batch.drain(..) {
            message.unacked();
        }
        self.batch_bytes = 0;
        Ok(true)
    }

    /// After a reconnection: waits until every topic of the batch that had subscribers
    /// at Redis before the loss has as many again (the other processes resubscribed),
    /// or until the settling time is over. False when the broker stops first.
    fn wait_for_subscribers(&mut self, con: &mut redis::Connection) -> RedisResult<bool> {
        let shared = self.shared;
        loop {
            let Some(settle) = self.settle.as_mut() else {
                return Ok(true);
            };
            let mut expected: HashMap<&str, i64> = HashMap::new();
            for message in &self.batch {
                let topic = &*message.topic;
                if settle.back.contains(topic) {
                    continue;
                }
                if let Some(&n) = self.receivers.get(topic).filter(|&&n| n > 0) {
                    expected.insert(topic, n);
                }
            }
            if expected.is_empty() {
                return Ok(true);
            }
            if Instant::now() >= settle.until {
                let example = expected.keys().next().copied().unwrap_or_default();
                tracing::warn!(
                    addr = %shared.addr,
                    "Redis broker: {} topics still have fewer subscribers at Redis than \
                     before it went away, {:.1} s after reconnecting (e.g. {example:?}); \
                     forwarding the backlog: a process that has not resubscribed yet \
                     misses it",
                    expected.len(),
                    settle.since.elapsed().as_secs_f64()
                );
                self.settle = None;
                return Ok(true);
            }
            let channels: Vec<String> = expected
                .keys()
                .map(|topic| {
                    let mut channel = String::new();
                    shared.channel_into(topic, &mut channel);
                    channel
                })
                .collect();
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channels)
                .query(con)?;
            let mut waiting = false;
            for (channel, n) in counts {
                let Some(topic) = channel.strip_prefix(shared.config.prefix.as_str()) else {
                    continue;
                };
                match expected.get(topic) {
                    Some(&want) if n >= want => {
                        settle.back.insert(topic.into());
                    }
                    Some(_) => waiting = true,
                    None => {}
                }
            }
            if !waiting {
                tracing::debug!(
                    addr = %shared.addr,
                    "Redis broker: subscribers back {:.3} s after reconnecting",
                    settle.since.elapsed().as_secs_f64()
                );
                return Ok(true);
            }
            if !wait_unless_stopped(self.stop, SETTLE_POLL) {
                return Ok(false);
            }
        }
    }

    /// Stopping: what is still in the backlog will not be forwarded.
    fn abandon(&mut self) {
        let shared = self.shared;
        let mut count = self.batch.len() as u64;
        let mut bytes = self.batch_bytes as u64;
        for message in self.batch.drain(..) {
            message.unacked();
        }
        self.batch_bytes = 0;
        for message in self.queue.try_iter() {
            count += 1;
            bytes += message.payload.len() as u64;
            message.unacked();
        }
        if count > 0 {
            shared.release(count, bytes);
            shared.failed(count);
            tracing::warn!(
                addr = %shared.addr,
                "Redis broker: stopped with {count} messages in the backlog; they were \
                 not forwarded"
            );
        }
    }
}

/// The history script's reply: the offset and epoch (none for a publication sent
/// again and numbered before), and the receivers (none then).
fn numbered(parts: &[Value]) -> (Option<(u64, std::sync::Arc<str>)>, Option<i64>) {
    let offset = match parts.first() {
        Some(Value::Int(n)) if *n > 0 => Some(*n as u64),
        _ => None,
    };
    let epoch = match parts.get(1) {
        Some(Value::BulkString(b)) if !b.is_empty() => std::str::from_utf8(b).ok().map(Into::into),
        Some(Value::SimpleString(s)) if !s.is_empty() => Some(s.as_str().into()),
        _ => None,
    };
    let receivers = match parts.get(2) {
        Some(Value::Int(n)) if *n >= 0 => Some(*n),
        _ => None,
    };
    (offset.zip(epoch), receivers)
}

/// Remembers that Redis counted `n` subscribers at the last `PUBLISH` to `topic`.
fn remember(receivers: &mut HashMap<Box<str>, i64>, topic: &str, n: i64) {
    if let Some(count) = receivers.get_mut(topic) {
        *count = n;
        return;
    }
    if receivers.len() >= MAX_REMEMBERED_TOPICS {
        receivers.clear();
    }
    receivers.insert(topic.into(), n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscriber_counts_remembered_are_bounded() {
        let mut receivers = HashMap::new();
        remember(&mut receivers, "a", 2);
        remember(&mut receivers, "a", 3);
        assert_eq!(receivers.get("a"), Some(&3));
        for i in 0..MAX_REMEMBERED_TOPICS + 5 {
            remember(&mut receivers, &format!("t{i}"), 1);
        }
        assert!(receivers.len() <= MAX_REMEMBERED_TOPICS);
    }
}
