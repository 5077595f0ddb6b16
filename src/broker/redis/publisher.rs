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
//! order within its topic: all of a topic's messages to be sent again take the route
//! of its first one ([`align_routes`]). A master that is away has its shard's
//! messages held in the batch, in order, and is tried again after a backoff of its
//! own, while the other shards' messages go on. See the module docs of [`super`] for
//! the guarantees.

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
/// How often messages held for a master that is away, or for a slot no master serves,
/// are looked at again (their master itself is tried after its own backoff).
const HELD_RETRY: Duration = Duration::from_millis(200);
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
        down: HashMap::new(),
    };
    let mut nodes = Nodes::default();
    let mut after_loss = false;
    while let Some(unreachable) = shared.connect(
        &mut link,
        || shared.reach(&mut nodes),
        |d| wait_unless_stopped(stop, d),
    ) {
        link.connected(shared);
        // With a cluster: the masters away now; their shards wait, the others go on.
        for (addr, e) in unreachable {
            let _ = sender.node_failed(&mut nodes, &addr, &e);
        }
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
    /// With a cluster: the masters the publisher cannot reach now. Their shards'
    /// messages are held in the batch, in order; the other shards' go on.
    down: HashMap<String, NodeDown>,
}

/// A master the publisher lost: tried again with its own backoff.
struct NodeDown {
    since: Instant,
    retry_at: Instant,
    backoff: super::Backoff,
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
        self.shared.set_publisher_up(self.down.is_empty());
        if self.shared.config.history.is_some() {
            let addrs: Vec<String> = nodes.cons.keys().cloned().collect();
            for addr in addrs {
                let loaded = nodes
                    .get(self.shared, &addr)
                    .and_then(|(con, _)| self.load_script(con));
                if let Err(e) = loaded {
                    self.node_failed(nodes, &addr, &e)?;
                }
            }
        }
        // What the last connection could not send goes first, as it was.
        if !self.batch.is_empty() && !self.send(nodes)? {
            return Ok(());
        }
        loop {
            // What is in the batch now is held for masters that are away (a cluster):
            // it does not count against the size of the next pipeline.
            let (held, held_bytes) = (self.batch.len(), self.batch_bytes);
            // Held messages are tried again when their master's wait is over, or
            // shortly (a slot no master serves now).
            let health = self.shared.config.health_interval;
            let idle = match self.down.values().map(|d| d.retry_at).min() {
                _ if held == 0 => health,
                Some(at) => at
                    .saturating_duration_since(Instant::now())
                    .min(HELD_RETRY)
                    .min(health),
                None => HELD_RETRY.min(health),
            };
            select! {
                recv(self.queue) -> message => match message {
                    Ok(message) => self.take(message),
                    Err(_) => return Ok(()),
                },
                recv(self.stop) -> _ => return Ok(()),
                default(idle) => {
                    self.ping(nodes)?;
                    if held == 0 {
                        continue;
                    }
                }
            }
            while self.batch.len() - held < MAX_BATCH_MESSAGES
                && self.batch_bytes - held_bytes < MAX_BATCH_BYTES
            {
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

    /// Checks every connection with a `PING`, and tries again the masters that are
    /// away whose wait is over.
    fn ping(&mut self, nodes: &mut Nodes) -> RedisResult<()> {
        let mut failed = Vec::new();
        for (addr, con) in &mut nodes.cons {
            if let Err(e) = redis::cmd("PING").exec(con) {
                failed.push((addr.clone(), e));
            }
        }
        for (addr, e) in failed {
            self.node_failed(nodes, &addr, &e)?;
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .down
            .iter()
            .filter(|(_, d)| now >= d.retry_at)
            .map(|(addr, _)| addr.clone())
            .collect();
        for addr in due {
            self.reach_node(nodes, &addr)?;
        }
        Ok(())
    }

    /// Connects to `addr` (loading the script on a new connection); a failure marks
    /// the node away (with a single Redis: `Err`).
    fn reach_node(&mut self, nodes: &mut Nodes, addr: &str) -> RedisResult<bool> {
        let shared = self.shared;
        let reached = nodes.get(shared, addr).and_then(|(con, fresh)| {
            if fresh && shared.config.history.is_some() {
                self.load_script(con)?;
            }
            Ok(())
        });
        match reached {
            Ok(()) => {
                self.node_back(addr);
                Ok(true)
            }
            Err(e) => self.node_failed(nodes, addr, &e).map(|()| false),
        }
    }

    /// A connection to `addr` failed. With a single Redis, `Err`: the publisher
    /// reconnects and everything waits. With a cluster the node is marked away, its
    /// shard's messages are held (in order) and tried again after a backoff of its
    /// own, and the other shards go on.
    fn node_failed(
        &mut self,
        nodes: &mut Nodes,
        addr: &str,
        error: &redis::RedisError,
    ) -> RedisResult<()> {
        let shared = self.shared;
        nodes.forget(addr);
        if shared.seeds.is_empty() {
            return Err(error.clone());
        }
        shared
            .metrics
            .connection_errors
            .fetch_add(1, Ordering::Relaxed);
        // A failover, perhaps: where are the slots now?
        shared.refresh_asked.store(true, Ordering::Release);
        let now = Instant::now();
        match self.down.get_mut(addr) {
            Some(down) => {
                down.retry_at = now + down.backoff.next();
                tracing::debug!(
                    addr = %addr,
                    "Redis broker: publisher still cannot reach this master: {error}"
                );
            }
            None => {
                let mut backoff = super::Backoff::new(
                    shared.config.backoff_min,
                    shared.config.backoff_max,
                    super::seeded_rng(&shared.origin),
                );
                let retry_at = now + backoff.next();
                tracing::warn!(
                    addr = %addr,
                    "Redis broker: publisher lost this master: {error}; the messages of \
                     the topics it serves are held in the backlog, in order, until it or \
                     a master that takes over its slots is reached; the other shards' \
                     messages go on"
                );
                self.down.insert(
                    addr.to_owned(),
                    NodeDown {
                        since: now,
                        retry_at,
                        backoff,
                    },
                );
                shared.set_publisher_up(false);
            }
        }
        Ok(())
    }

    /// `addr` answered: if it was away, its held messages go (once the subscribers
    /// are back on it: see [`Settle`]).
    fn node_back(&mut self, addr: &str) {
        let Some(down) = self.down.remove(addr) else {
            return;
        };
        tracing::info!(
            addr = %addr,
            "Redis broker: publisher reached this master again after {:.1} s; sending \
             what was held for it once the other processes have resubscribed",
            down.since.elapsed().as_secs_f64()
        );
        self.restart_settle();
        if self.down.is_empty() {
            self.shared.set_publisher_up(true);
        }
    }

    /// Forgets the masters away that serve no slot any more (their slots moved, to a
    /// replica that took over, say): their topics' messages go to the new owner.
    fn forget_former_masters(&mut self, topology: &cluster::Topology) {
        if self.down.is_empty() {
            return;
        }
        let masters = topology.masters();
        self.down.retain(|addr, _| masters.contains(&addr.as_str()));
        if self.down.is_empty() {
            self.shared.set_publisher_up(true);
        }
    }

    /// Whether `addr` is away and not to be tried yet.
    fn waiting_for(&self, addr: &str, now: Instant) -> bool {
        self.down.get(addr).is_some_and(|d| now < d.retry_at)
    }

    /// Starts the wait for the subscribers again, unless one is under way.
    fn restart_settle(&mut self) {
        let now = Instant::now();
        if self.settle.as_ref().is_none_or(|s| now >= s.until) {
            self.settle(now);
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
                tracing::warn!(
                    addr = %self.shared.addr,
                    "Redis broker: {} messages were still redirected after {MAX_ROUNDS} \
                     rounds (the slot map kept changing); none is dropped: they are kept, \
                     in order, and sent again once the connections are up again with a \
                     fresh slot map",
                    pending.len()
                );
                break Err(super::redis_error(
                    "still redirected after 16 rounds; reconnecting with a fresh slot map",
                ));
            }
            let topology = self.shared.topology();
            self.forget_former_masters(&topology);
            let now = Instant::now();
            let mut groups: IndexMap<String, Vec<(usize, bool)>> = IndexMap::new();
            for (i, route) in pending.drain(..) {
                let (addr, asking) = match route {
                    Route::Ask(addr) => (addr, true),
                    Route::Owner => {
                        self.shared
                            .channel_into(&self.batch[i].topic, &mut self.channel);
                        match topology.owner(cluster::slot(self.channel.as_bytes())) {
                            Some(addr) => (addr.to_owned(), false),
                            // No master serves its slot now: held (with every later
                            // message of its topic, which has the same slot) until one
                            // does; the slot map is read again meanwhile.
                            None => {
                                self.shared.refresh_asked.store(true, Ordering::Release);
                                continue;
                            }
                        }
                    }
                };
                // A master that is away: held, in order, until it is tried again.
                if self.waiting_for(&addr, now) {
                    continue;
                }
                groups.entry(addr).or_default().push((i, asking));
            }
            let mut again = Vec::new();
            let mut later = false;
            let mut moved = false;
            let mut failed = None;
            for (addr, members) in &groups {
                match self.send_to(
                    nodes, addr, members, &mut done, &mut again, &mut later, &mut moved,
                ) {
                    Ok(()) => self.node_back(addr),
                    // Its messages are held (not done, not sent again this time); the
                    // other masters' go on. With a single Redis: the session ends.
                    Err(e) => {
                        if let Err(e) = self.node_failed(nodes, addr, &e) {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
            // In publish order again, whatever node each went to, and each topic's
            // messages on one route.
            again.sort_by_key(|(i, _)| *i);
            let batch = &self.batch;
            align_routes(&mut again, |i| &batch[i].topic);
            pending = again;
            if moved {
                if let Err(e) = self.shared.refresh(nodes) {
                    break Err(e);
                }
                self.restart_settle();
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
            match outcome(replies.next()) {
                Outcome::Published {
                    position,
                    receivers,
                } => {
                    if let Some(n) = receivers {
                        remember(&mut self.receivers, &message.topic, n);
                    }
                    if let Some(ack) = message.ack.take() {
                        ack(position);
                    }
                }
                Outcome::Redirect(Redirect::Moved { slot, addr }) => {
                    shared.moved(slot, &addr);
                    *moved = true;
                    again.push((i, Route::Owner));
                    continue;
                }
                Outcome::Redirect(Redirect::Ask { addr }) => {
                    shared.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                    again.push((i, Route::Ask(addr)));
                    continue;
                }
                Outcome::Redirect(Redirect::Later) => {
                    shared.metrics.redirects.fetch_add(1, Ordering::Relaxed);
                    *later = true;
                    again.push((i, Route::Owner));
                    continue;
                }
                Outcome::NoScript => {
                    // A node that restarted or was promoted since the script was
                    // loaded: loaded again below, sent again next round.
                    reload = true;
                    again.push((i, Route::Owner));
                    continue;
                }
                // Redis answered, but did not publish (an ACL, say, or a message the
                // history script found out of order): sending it again would get the
                // same answer.
                Outcome::Refused(why) => {
                    refused += 1;
                    error.get_or_insert(why);
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
            // The channels to ask about, by the node serving them (not a master that
            // is away: its messages are held anyway).
            let mut by_node: IndexMap<String, Vec<String>> = IndexMap::new();
            for topic in expected.keys() {
                let channel = shared.channel(topic);
                if let Some(owner) = shared.owner(&channel) {
                    if !self.down.contains_key(&owner) {
                        by_node.entry(owner).or_default().push(channel);
                    }
                }
            }
            let since = settle.since;
            let mut waiting = false;
            let mut failed = Vec::new();
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
                        failed.push((addr, e));
                        continue;
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
            for (addr, e) in failed {
                // A single Redis: `Err`, the session ends; a master of a cluster is
                // marked away and its messages are held.
                self.node_failed(nodes, &addr, &e)?;
            }
            if !waiting {
                tracing::debug!(
                    addr = %shared.addr,
                    "Redis broker: subscribers back {:.3} s after reconnecting",
                    since.elapsed().as_secs_f64()
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

/// What Redis made of one publication.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Published: its offset and epoch (with the history script) and the subscribers
    /// Redis counted (none for a resend numbered before).
    Published {
        position: Option<(u64, std::sync::Arc<str>)>,
        receivers: Option<i64>,
    },
    /// To be sent again, elsewhere or later.
    Redirect(Redirect),
    /// The history script is not loaded on that node.
    NoScript,
    /// Answered, not published: a failure (counted in `publish_failed`), why.
    Refused(String),
}

/// Reads the reply to one `PUBLISH` / `SPUBLISH` / history script.
fn outcome(reply: Option<&Value>) -> Outcome {
    match reply {
        Some(Value::Int(n)) => Outcome::Published {
            position: None,
            receivers: Some(*n),
        },
        Some(Value::Array(parts)) => {
            // The history script: {offset, epoch, receivers}; {-1, "", -1} when this
            // process had a later publication numbered on the topic already.
            if let Some(Value::Int(n)) = parts.first() {
                if *n <= 0 {
                    return Outcome::Refused(
                        "the history script found a later publication of this process \
                         on the topic numbered already (this one arrived out of order, \
                         or its first send was executed and its reply lost); it was not \
                         published again"
                            .to_owned(),
                    );
                }
            }
            let (position, receivers) = numbered(parts);
            Outcome::Published {
                position,
                receivers,
            }
        }
        Some(Value::ServerError(e)) => match Redirect::of(e) {
            Some(redirect) => Outcome::Redirect(redirect),
            None if e.kind() == Some(ServerErrorKind::NoScript) => Outcome::NoScript,
            None => Outcome::Refused(e.to_string()),
        },
        // Fewer replies than commands would be a protocol error, which `query` reports.
        other => Outcome::Refused(format!("an unexpected reply: {other:?}")),
    }
}

/// Keeps each topic's messages together for the next round: every message of a topic
/// takes the route of its topic's first one (`again` is in publish order), so that a
/// later message never goes to another node, or in an earlier pipeline, than an
/// earlier one still to be sent (a `TRYAGAIN` for one and an `ASK` for the next, say).
fn align_routes<'t>(again: &mut [(usize, Route)], topic: impl Fn(usize) -> &'t str) {
    let mut first: HashMap<&'t str, Route> = HashMap::new();
    for (i, route) in again.iter_mut() {
        match first.get(topic(*i)) {
            Some(leader) => route.clone_from(leader),
            None => {
                first.insert(topic(*i), route.clone());
            }
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

    fn server_error(text: &str) -> Value {
        redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap()
    }

    #[test]
    fn replies_are_published_redirected_or_refused() {
        assert_eq!(
            outcome(Some(&Value::Int(3))),
            Outcome::Published {
                position: None,
                receivers: Some(3)
            }
        );
        let script = |off: i64, epoch: &str, n: i64| {
            Value::Array(vec![
                Value::Int(off),
                Value::BulkString(epoch.as_bytes().to_vec()),
                Value::Int(n),
            ])
        };
        assert_eq!(
            outcome(Some(&script(7, "e1", 2))),
            Outcome::Published {
                position: Some((7, "e1".into())),
                receivers: Some(2)
            }
        );
        // A resend numbered already: published, with its offset, no count.
        assert_eq!(
            outcome(Some(&script(7, "e1", -1))),
            Outcome::Published {
                position: Some((7, "e1".into())),
                receivers: None
            }
        );
        // Older than the last numbered publication of this process there: not
        // published, a failure (never counted as published).
        assert!(matches!(
            outcome(Some(&script(-1, "", -1))),
            Outcome::Refused(why) if why.contains("out of order")
        ));
        assert_eq!(
            outcome(Some(&server_error("ASK 12 127.0.0.1:7001"))),
            Outcome::Redirect(Redirect::Ask {
                addr: "127.0.0.1:7001".into()
            })
        );
        assert_eq!(
            outcome(Some(&server_error(
                "TRYAGAIN Multiple keys request during rehashing"
            ))),
            Outcome::Redirect(Redirect::Later)
        );
        assert_eq!(
            outcome(Some(&server_error("NOSCRIPT No matching script"))),
            Outcome::NoScript
        );
        assert!(matches!(
            outcome(Some(&server_error("NOPERM no permissions"))),
            Outcome::Refused(_)
        ));
        assert!(matches!(outcome(None), Outcome::Refused(_)));
    }

    #[test]
    fn a_topics_messages_take_one_route_in_publish_order() {
        let topics = ["a", "b", "a", "a", "b", "c"];
        let ask = |n: u16| Route::Ask(format!("127.0.0.1:{n}"));
        // Message 0 of "a" got TRYAGAIN (Owner, later), 2 and 3 an ASK; 1 of "b" an
        // ASK, 4 of "b" a MOVED; 5 of "c" alone.
        let mut again = vec![
            (0, Route::Owner),
            (1, ask(7001)),
            (2, ask(7002)),
            (3, ask(7002)),
            (4, Route::Owner),
            (5, ask(7003)),
        ];
        align_routes(&mut again, |i| topics[i]);
        assert_eq!(
            again,
            [
                (0, Route::Owner),
                (1, ask(7001)),
                (2, Route::Owner),
                (3, Route::Owner),
                (4, ask(7001)),
                (5, ask(7003)),
            ]
        );
    }

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
