//! The publisher thread: one Redis connection per node (one for a single Redis, one per
//! master of a cluster) for the whole process, fed by the bounded publish queue,
//! sending everything queued in one pipelined batch per node and round trip.
//!
//! A message taken out of the queue stays in the current batch until Redis has
//! answered its `PUBLISH`. When a send fails, what was not answered is kept exactly as
//! it was numbered (same sequence numbers) and sent again, first, once a new
//! connection is up; while Redis is away nothing more is taken out of the queue, so
//! the queue is the backlog, in publish order. With a cluster, a message redirected
//! (`MOVED`: the slot map is read again; `ASK`: once, after `ASKING`; `TRYAGAIN`:
//! shortly) is sent again where it belongs, after the others of its node, still in
//! order within its topic. See the module docs of [`super`] for the guarantees.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, select};
use indexmap::IndexMap;
use redis::{RedisResult, ServerErrorKind, Value};

use super::cluster::{self, Redirect};
use super::envelope;
use super::history;
use super::{Link, LinkState, Nodes, Outbound, RateLimit, Shared, wait_unless_stopped};

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
/// Rounds of redirects one batch may take before the send counts as failed (and is
/// tried again after a backoff, from a fresh slot map).
const MAX_ROUNDS: usize = 16;
/// The wait before a message a node asked to retry (`TRYAGAIN`, `CLUSTERDOWN`) is
/// sent again.
const TRY_AGAIN_WAIT: Duration = Duration::from_millis(50);

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
        refused: 0,
        script: None,
        keys: [String::new(), String::new(), String::new()],
        origin_hex: history::origin_hex(&shared.origin),
        rng: super::seeded_rng(&shared.origin),
    };
    let mut nodes = Nodes::default();
    let mut after_loss = false;
    while shared
        .connect(
            &mut link,
            || shared.reach(&mut nodes),
            |d| wait_unless_stopped(stop, d),
        )
        .is_some()
    {
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
            sender.settle(Instant::now());
        }
        match sender.session(&mut nodes) {
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
    /// Taken from the queue, numbered, not yet acknowledged by Redis. Empty between
    /// batches.
    batch: Vec<Outbound>,
    /// Payload bytes in `batch`.
    batch_bytes: usize,
    /// The sequence number of the next message taken.
    next_seq: u64,
    pipe: redis::Pipeline,
    channel: String,
    envelope: Vec<u8>,
    /// Topic → subscribers Redis counted at its last `PUBLISH` there.
    receivers: HashMap<Box<str>, i64>,
    /// Set after a reconnection or a moved slot: the wait for the other processes to
    /// resubscribe.
    settle: Option<Settle>,
    refused_log: RateLimit,
    /// Messages of the current send that Redis refused (answered, not published).
    refused: u64,
    /// The SHA1 of [`history::PUBLISH_SCRIPT`] (with `RedisConfig::history`), the same
    /// on every server.
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

/// Where a message goes in the next round of a send.
#[derive(Clone)]
enum Route {
    /// The node serving its slot.
    Owner,
    /// This node, after `ASKING`.
    Ask(String),
}

impl Sender<'_> {
    /// One connection's life. `Ok` when the broker stops, `Err` when a connection is
    /// lost (what it did not answer is kept, to be sent again first).
    fn session(&mut self, nodes: &mut Nodes) -> RedisResult<()> {
        if self.shared.config.history.is_some() {
            let addrs: Vec<String> = nodes.cons.keys().cloned().collect();
            for addr in addrs {
                let (con, _) = nodes.get(self.shared, &addr)?;
                self.load_script(con).inspect_err(|_| nodes.forget(&addr))?;
            }
        }
        // What the last connection could not send goes first, as it was.
        if !self.batch.is_empty() && !self.send(nodes)? {
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
                    self.ping(nodes)?;
                    continue;
                }
            }
            while self.batch.len() < MAX_BATCH_MESSAGES && self.batch_bytes < MAX_BATCH_BYTES {
                let Ok(message) = self.queue.try_recv() else {
                    break;
                };
                self.take(message);
            }
            if !self.send(nodes)? {
                return Ok(());
            }
        }
    }

    /// Checks every connection with a `PING`.
    fn ping(&mut self, nodes: &mut Nodes) -> RedisResult<()> {
        let mut failed = None;
        for (addr, con) in &mut nodes.cons {
            if let Err(e) = redis::cmd("PING").exec(con) {
                failed = Some((addr.clone(), e));
                break;
            }
        }
        match failed {
            Some((addr, e)) => {
                nodes.forget(&addr);
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn load_script(&mut self, con: &mut redis::Connection) -> RedisResult<()> {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(history::PUBLISH_SCRIPT)
            .query(con)?;
        self.script = Some(sha);
        Ok(())
    }

    /// Takes a message into the batch and numbers it.
    fn take(&mut self, mut message: Outbound) {
        self.batch_bytes += message.payload.len();
        message.seq = self.next_seq;
        self.next_seq += 1;
        self.batch.push(message);
    }

    /// Starts (or restarts) the wait for the other processes to resubscribe.
    fn settle(&mut self, now: Instant) {
        let grace = self.shared.config.backoff_max + self.shared.config.io_timeout;
        self.settle = Some(Settle {
            since: now,
            until: now + grace,
            back: HashSet::new(),
        });
    }

    /// Sends the batch, each message to the node serving its topic, in rounds while
    /// nodes redirect some. `Ok(true)` once Redis has answered all of it (the batch is
    /// done), `Ok(false)` when the broker stops first, `Err` when a connection is lost:
    /// what was not answered is kept, numbered as it is, for the next connection.
    fn send(&mut self, nodes: &mut Nodes) -> RedisResult<bool> {
        let mut pending: Vec<(usize, Route)> =
            (0..self.batch.len()).map(|i| (i, Route::Owner)).collect();
        let mut done = vec![false; self.batch.len()];
        let mut rounds = 0;
        let result = loop {
            if pending.is_empty() {
                break Ok(true);
            }
            if self.settle.is_some() {
                let indices: Vec<usize> = pending.iter().map(|(i, _)| *i).collect();
                match self.wait_for_subscribers(nodes, &indices) {
                    Ok(true) => {}
                    other => break other,
                }
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                break Err(super::redis_error("still redirected after 16 rounds"));
            }
            let topology = self.shared.topology();
            let mut groups: IndexMap<String, Vec<(usize, bool)>> = IndexMap::new();
            let mut unserved = Vec::new();
            for (i, route) in pending.drain(..) {
                let (addr, asking) = match route {
                    Route::Ask(addr) => (addr, true),
                    Route::Owner => {
                        self.shared
                            .channel_into(&self.batch[i].topic, &mut self.channel);
                        match topology.owner(cluster::slot(self.channel.as_bytes())) {
                            Some(addr) => (addr.to_owned(), false),
                            None => {
                                unserved.push((i, Route::Owner));
                                continue;
                            }
                        }
                    }
                };
                groups.entry(addr).or_default().push((i, asking));
            }
            let mut again = unserved;
            let mut later = !again.is_empty();
            let mut moved = false;
            let mut failed = None;
            for (addr, members) in &groups {
                if let Err(e) = self.send_to(
                    nodes, addr, members, &mut done, &mut again, &mut later, &mut moved,
                ) {
                    nodes.forget(addr);
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            // In publish order again, whatever node each went to.
            again.sort_by_key(|(i, _)| *i);
            pending = again;
            if moved {
                if let Err(e) = self.shared.refresh(nodes) {
                    break Err(e);
                }
                let now = Instant::now();
                if self.settle.as_ref().is_none_or(|s| now >= s.until) {
                    self.settle(now);
                }
            }
            if later {
                let _ = self.shared.refresh(nodes);
                if !wait_unless_stopped(self.stop, TRY_AGAIN_WAIT) {
                    break Ok(false);
                }
            }
        };
        self.finish(&done);
        result
    }

    /// Sends `members` (indices into the batch; `true`: after `ASKING`) to `addr` in
    /// one pipeline and reads the answers: `done` for those answered, `again` for those
    /// redirected. `Err` when the connection fails.
    #[allow(clippy::too_many_arguments)]
    fn send_to(
        &mut self,
        nodes: &mut Nodes,
        addr: &str,
        members: &[(usize, bool)],
        done: &mut [bool],
        again: &mut Vec<(usize, Route)>,
        later: &mut bool,
        moved: &mut bool,
    ) -> RedisResult<()> {
        let shared = self.shared;
        let (con, fresh) = nodes.get(shared, addr)?;
        if fresh && shared.config.history.is_some() {
            self.load_script(con)?;
        }
        // Used only by a topic with no epoch yet: one candidate per round is enough.
        let epoch = if self.script.is_some() {
            history::new_epoch(&mut self.rng)
        } else {
            String::new()
        };
        self.pipe.clear();
        for &(i, asking) in members {
            if asking {
                self.pipe.cmd("ASKING");
            }
            self.encode(i, &epoch);
        }
        let replies: Vec<Value> = self.pipe.query(con)?;
        let mut replies = replies.iter();
        let mut refused = 0u64;
        let mut error = None;
        let mut reload = false;
        for &(i, asking) in members {
            if asking {
                replies.next();
            }
            let message = &mut self.batch[i];
            match replies.next() {
                Some(Value::Int(n)) => remember(&mut self.receivers, &message.topic, *n),
                Some(Value::Array(parts)) => {
                    // The history script: {offset, epoch, receivers}.
                    let (position, receivers) = numbered(parts);
                    if let Some(n) = receivers {
                        remember(&mut self.receivers, &message.topic, n);
                    }
                    if let Some(ack) = message.ack.take() {
                        ack(position);
                    }
                }
                Some(Value::ServerError(e)) => match Redirect::of(e) {
                    Some(Redirect::Moved { slot, addr }) => {
                        shared.moved(slot, &addr);
                        *moved = true;
                        again.push((i, Route::Owner));
                        continue;
                    }
                    Some(Redirect::Ask { addr }) => {
                        shared.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                        again.push((i, Route::Ask(addr)));
                        continue;
                    }
                    Some(Redirect::Later) => {
                        shared.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                        *later = true;
                        again.push((i, Route::Owner));
                        continue;
                    }
                    None if e.kind() == Some(ServerErrorKind::NoScript) => {
                        // A node that restarted or was promoted since the script was
                        // loaded: loaded again below, sent again next round.
                        reload = true;
                        again.push((i, Route::Owner));
                        continue;
                    }
                    None => {
                        refused += 1;
                        error.get_or_insert_with(|| e.to_string());
                    }
                },
                // Redis answered, with an error (an ACL, say): sending it again would
                // get the same answer. Fewer replies than commands would be a protocol
                // error, which `query` reports.
                other => {
                    refused += 1;
                    error.get_or_insert_with(|| format!("{other:?}"));
                }
            }
            done[i] = true;
        }
        if reload {
            self.load_script(con)?;
        }
        if refused > 0 {
            shared.failed(refused);
            self.refused += refused;
            if let Some(suppressed) = self.refused_log.check() {
                tracing::warn!(
                    addr = %addr,
                    "Redis broker: Redis refused {refused} PUBLISH commands: {}; those \
                     messages are dropped ({suppressed} more such lines held back)",
                    error.unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// Encodes message `i` of the batch into the pipeline: a `PUBLISH` (`SPUBLISH`), or
    /// with `RedisConfig::history` an `EVALSHA` of the history script (offset, epoch,
    /// stream entry, `PUBLISH`).
    fn encode(&mut self, i: usize, epoch: &str) {
        let shared = self.shared;
        let message = &self.batch[i];
        let publish = shared.commands().publish;
        shared.channel_into(&message.topic, &mut self.channel);
        self.envelope.clear();
        envelope::encode(
            &shared.origin,
            message.seq,
            message.kind,
            &message.payload,
            &mut self.envelope,
        );
        match (&self.script, shared.config.history) {
            (Some(sha), Some(h)) => {
                self.keys = [
                    shared.key(&message.topic, "meta"),
                    shared.key(&message.topic, "stream"),
                    history::origin_key(shared, &message.topic, &self.origin_hex),
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
                    .arg(epoch)
                    .arg(history::now_ms())
                    .arg(message.seq)
                    .arg(publish);
            }
            _ => {
                self.pipe
                    .cmd(publish)
                    .arg(self.channel.as_str())
                    .arg(self.envelope.as_slice());
            }
        }
    }

    /// Releases what Redis answered (`done`) from the batch and the backlog; keeps
    /// the rest, in order.
    fn finish(&mut self, done: &[bool]) {
        let shared = self.shared;
        let mut count = 0u64;
        let mut bytes = 0u64;
        let mut kept = Vec::with_capacity(self.batch.len() - done.iter().filter(|&&d| d).count());
        for (message, &done) in self.batch.drain(..).zip(done) {
            if done {
                count += 1;
                bytes += message.payload.len() as u64;
                message.unacked();
            } else {
                kept.push(message);
            }
        }
        self.batch = kept;
        self.batch_bytes -= bytes as usize;
        let refused = std::mem::take(&mut self.refused);
        shared
            .metrics
            .published
            .fetch_add(count - refused.min(count), Ordering::Relaxed);
        shared.release(count, bytes);
    }

    /// After a reconnection: waits until every topic of the batch (those at
    /// `indices`) that had subscribers at Redis before the loss has as many again (the
    /// other processes resubscribed), or until the settling time is over. False when
    /// the broker stops first.
    fn wait_for_subscribers(&mut self, nodes: &mut Nodes, indices: &[usize]) -> RedisResult<bool> {
        let shared = self.shared;
        loop {
            let Some(settle) = self.settle.as_mut() else {
                return Ok(true);
            };
            let mut expected: HashMap<&str, i64> = HashMap::new();
            for &i in indices {
                let topic = &*self.batch[i].topic;
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
            // The channels to ask about, by the node serving them.
            let mut by_node: IndexMap<String, Vec<String>> = IndexMap::new();
            for topic in expected.keys() {
                let channel = shared.channel(topic);
                if let Some(owner) = shared.owner(&channel) {
                    by_node.entry(owner).or_default().push(channel);
                }
            }
            let mut waiting = by_node.is_empty();
            for (addr, channels) in by_node {
                let counts: RedisResult<Vec<(String, i64)>> =
                    nodes.get(shared, &addr).and_then(|(con, _)| {
                        redis::cmd("PUBSUB")
                            .arg(shared.commands().numsub)
                            .arg(&channels)
                            .query(con)
                    });
                let counts = match counts {
                    Ok(counts) => counts,
                    // A slot that moved meanwhile: asked again at the next poll.
                    Err(e) if Redirect::of_error(&e).is_some() => {
                        waiting = true;
                        continue;
                    }
                    Err(e) => {
                        nodes.forget(&addr);
                        return Err(e);
                    }
                };
                for (channel, n) in counts {
                    let Some(topic) = shared.topic_of(&channel) else {
                        continue;
                    };
                    match expected.get(&*topic) {
                        Some(&want) if n >= want => {
                            settle.back.insert(topic.into());
                        }
                        Some(_) => waiting = true,
                        None => {}
                    }
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
