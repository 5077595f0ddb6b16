//! The subscriber thread(s): a Redis connection in Pub/Sub mode (RESP3) for the whole
//! process; with Redis Cluster one per master, each on its own thread
//! (`ringsocket-rsub-<n>`), under a supervisor (`ringsocket-rsub`) that reads the slot
//! map and gives each connection the topics its node serves.
//!
//! A connection learns that its node no longer serves a topic from the `sunsubscribe`
//! Redis sends when a slot moves, or from a lost connection (a failover): it asks the
//! supervisor to read the slot map again, which then hands the topic to the node that
//! serves it now. The publishers wait for the subscribers to be back (see the
//! publisher), and a `ringsocket.v1` subscriber reads what it still missed from the
//! topic's stream (the gap fill below).

use std::collections::{HashMap, HashSet};
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use redis::{PushInfo, PushKind, RedisResult, Value};

use super::NAME;
use super::cluster;
use super::envelope::{self, Origin};
use super::history;
use super::{
    Link, LinkState, Nodes, POLL_INTERVAL, RateLimit, Shared, Wants, lock, wait_unless_stopped,
};
use crate::broker::{Accepted, Inbound, report};

/// Channels per `SUBSCRIBE` / `UNSUBSCRIBE` command when many change at once.
const CHANNELS_PER_COMMAND: usize = 512;

/// Other processes whose last sequence number is remembered. Past it the memory starts
/// over (a process gets a new origin at each start, so old ones pile up): the only
/// cost is that a duplicate arriving right then is not recognised.
const MAX_ORIGINS: usize = 1024;
/// Lanes (topics, with Redis Cluster) remembered for all origins together; past it
/// the memory starts over too.
const MAX_LANES: usize = 65_536;

/// Runs until the broker stops: for a single Redis the one connection; for a
/// cluster, the supervisor of one connection per master.
pub(super) fn run(shared: &Shared, stop: &Receiver<()>, reads: &Sender<history::Read>) {
    if shared.seeds.is_empty() {
        shared.metrics.shards.store(1, Ordering::Relaxed);
        let seen = Mutex::new(Seen::default());
        run_link(shared, &shared.wants, &shared.addr, &seen, stop, reads);
    } else {
        supervise(shared, stop, reads);
    }
}

/// With a cluster: reads the slot map (every health interval, and when a connection
/// asks), runs one connection per master, and gives each the wanted topics its node
/// serves.
fn supervise(shared: &Shared, stop: &Receiver<()>, reads: &Sender<history::Read>) {
    // One memory of sequence numbers for every shard's connection: a topic whose slot
    // moves keeps its highest numbers on the new shard, so a resend that arrives there
    // is still recognised.
    let received = Mutex::new(Seen::default());
    let received = &received;
    std::thread::scope(|scope| {
        let mut shards: HashMap<String, Arc<Wants>> = HashMap::new();
        let mut nodes = Nodes::default();
        let refresh_log = RateLimit::new();
        let mut next_refresh = Instant::now();
        let mut seen = u64::MAX;
        let mut spawned = 0u64;
        loop {
            if shared.stopping() {
                break;
            }
            let now = Instant::now();
            if now >= next_refresh || shared.refresh_asked.swap(false, Ordering::AcqRel) {
                next_refresh = now + shared.config.health_interval;
                if let Err(e) = shared.refresh(&mut nodes) {
                    if let Some(suppressed) = refresh_log.check() {
                        tracing::warn!(
                            addr = %shared.addr,
                            "Redis broker: cannot read the cluster slot map: {e}; retrying \
                             ({suppressed} more such lines held back)"
                        );
                    }
                }
            }
            let generation = shared.generation.load(Ordering::Acquire);
            if generation != seen || shared.wants.take_changed() {
                seen = generation;
                let topology = shared.topology();
                let masters = topology.masters();
                shards.retain(|addr, wants| {
                    let keep = masters.contains(&addr.as_str());
                    if !keep {
                        tracing::info!(addr = %addr, "Redis broker: node no longer serves slots; its subscriber connection closes");
                        wants.retired.store(true, Ordering::Release);
                    }
                    keep
                });
                for master in masters {
                    if shards.contains_key(master) {
                        continue;
                    }
                    let wants = Arc::new(Wants::default());
                    let (addr, link_wants) = (master.to_owned(), wants.clone());
                    spawned += 1;
                    let started = std::thread::Builder::new()
                        .name(format!("ringsocket-rsub-{spawned}"))
                        .spawn_scoped(scope, move || {
                            run_link(shared, &link_wants, &addr, received, stop, reads)
                        });
                    match started {
                        Ok(_) => {
                            shards.insert(master.to_owned(), wants);
                        }
                        Err(e) => tracing::error!(
                            addr = %master,
                            "Redis broker: cannot start a subscriber thread: {e}"
                        ),
                    }
                }
                let mut by_node: HashMap<&str, HashSet<String>> = HashMap::new();
                let mut channel = String::new();
                for topic in lock(&shared.wants.set).iter() {
                    shared.channel_into(topic, &mut channel);
                    if let Some(owner) = topology.owner(cluster::slot(channel.as_bytes())) {
                        by_node.entry(owner).or_default().insert(topic.clone());
                    }
                }
                for (addr, wants) in &shards {
                    let mine = by_node.remove(addr.as_str()).unwrap_or_default();
                    wants.change(|set| {
                        let changed = *set != mine;
                        *set = mine;
                        changed
                    });
                }
                shared
                    .metrics
                    .shards
                    .store(shards.len() as u64, Ordering::Relaxed);
            }
            if !wait_unless_stopped(stop, POLL_INTERVAL) {
                break;
            }
        }
        for wants in shards.values() {
            wants.retired.store(true, Ordering::Release);
        }
        shared.metrics.shards.store(0, Ordering::Relaxed);
    });
}

/// One subscriber connection, to `addr` (the one Redis, or a master), for the topics
/// in `wants`: connect, subscribe, receive; on a loss, reconnect with backoff and
/// start over. Ends when the broker stops or `wants` is retired.
fn run_link(
    shared: &Shared,
    wants: &Wants,
    addr: &str,
    seen: &Mutex<Seen>,
    stop: &Receiver<()>,
    reads: &Sender<history::Read>,
) {
    let mut link = LinkState::at(Link::Subscriber, shared, addr);
    let (push_tx, pushes) = mpsc::channel();
    let mut listener = Listener {
        shared,
        wants,
        addr,
        pushes,
        subscribed: HashSet::new(),
        health: String::new(),
        health_moved: false,
        malformed_log: RateLimit::new(),
        oversized_log: RateLimit::new(),
        subscribe_error_log: RateLimit::new(),
        seen,
        reads,
    };
    let wait = |d: Duration| {
        let until = Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            if wants.retired() || !wait_unless_stopped(stop, left.min(POLL_INTERVAL)) {
                return false;
            }
        }
    };
    while let Some(mut con) = shared.connect(&mut link, || shared.open(addr, true), wait) {
        con.set_push_sender(push_tx.clone());
        let result = listener.session(&mut con, &mut link);
        listener.unsubscribed_all();
        match result {
            Ok(()) => break,
            Err(e) => {
                link.lost(shared, &e);
                // A failover, perhaps: where are the slots now?
                shared.refresh_asked.store(true, Ordering::Release);
            }
        }
    }
    if wants.retired() && !shared.stopping() {
        shared.drop_subscriber_link(&link);
    } else {
        link.closed(shared);
    }
}

/// A subscriber connection's state that outlives one connection.
struct Listener<'a> {
    shared: &'a Shared,
    wants: &'a Wants,
    addr: &'a str,
    /// What Redis pushes on the connection: messages, (un)subscriptions.
    pushes: mpsc::Receiver<PushInfo>,
    /// Topics subscribed on the current connection.
    subscribed: HashSet<String>,
    /// A channel of this node that no topic uses, subscribed again as the health check
    /// (the confirmation shows the connection works).
    health: String,
    /// Set when the health channel's slot moved away from this node.
    health_moved: bool,
    malformed_log: RateLimit,
    oversized_log: RateLimit,
    subscribe_error_log: RateLimit,
    /// Shared by every shard's connection (see [`supervise`]).
    seen: &'a Mutex<Seen>,
    /// The history reader's questions (gap fills).
    reads: &'a Sender<history::Read>,
}

/// The highest sequence number received from each other process, per lane (with Redis
/// Cluster, per topic), to drop what a process sends again after its connection broke
/// mid-batch (see the publisher).
///
/// Redis passes each connection's commands on in the order it executes them, and a
/// process sends its messages in sequence order, resending an unacknowledged batch
/// from its start before anything newer: so a number at or below the highest seen is
/// one received already. Across the nodes of a cluster only each topic keeps that
/// order (a redirected message follows later ones of other topics).
#[derive(Default)]
struct Seen {
    highest: HashMap<Origin, HashMap<Box<str>, u64>>,
    lanes: usize,
}

impl Seen {
    /// Whether message `seq` of `origin` in `lane` is new (and remembers it).
    fn fresh(&mut self, origin: Origin, lane: &str, seq: u64) -> bool {
        if let Some(highest) = self
            .highest
            .get_mut(&origin)
            .and_then(|lanes| lanes.get_mut(lane))
        {
            if seq <= *highest {
                return false;
            }
            *highest = seq;
            return true;
        }
        if self.lanes >= MAX_LANES
            || (self.highest.len() >= MAX_ORIGINS && !self.highest.contains_key(&origin))
        {
            self.highest.clear();
            self.lanes = 0;
        }
        self.highest
            .entry(origin)
            .or_default()
            .insert(lane.into(), seq);
        self.lanes += 1;
        true
    }
}

impl Listener<'_> {
    /// One connection's life. `Ok` when the broker stops (or the connection is
    /// retired), `Err` when the connection is lost.
    fn session(&mut self, con: &mut redis::Connection, link: &mut LinkState) -> RedisResult<()> {
        let shared = self.shared;
        // Left from the last connection.
        while self.pushes.try_recv().is_ok() {}
        let _ = self.wants.take_changed();
        let mut health_generation = shared.generation.load(Ordering::Acquire);
        self.health = self.health_channel();
        self.health_moved = false;
        self.sync(con)?;
        con.set_read_timeout(Some(POLL_INTERVAL))?;
        // Up once the first health check is answered.
        let mut ping_sent = Some(self.ping(con)?);
        let mut alive = Instant::now();
        let mut up = false;
        loop {
            if shared.stopping() || self.wants.retired() {
                return Ok(());
            }
            if self.wants.take_changed() {
                self.sync(con)?;
            }
            // The health channel's slot moved (the node dropped it, or refused the
            // check): once the slot map has changed, a channel of a slot the node
            // still serves, and the check again (not a reconnection).
            if self.health_moved {
                let generation = shared.generation.load(Ordering::Acquire);
                if generation != health_generation {
                    health_generation = generation;
                    let channel = self.health_channel();
                    // The same one while the slot map does not show the move yet.
                    if channel != self.health {
                        self.health = channel;
                        self.health_moved = false;
                        tracing::debug!(addr = %self.addr, "Redis broker: the health check's slot moved; checking on another");
                        ping_sent = Some(self.ping(con)?);
                    }
                }
            }
            match ping_sent {
                Some(sent) if sent.elapsed() > shared.config.io_timeout => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "no answer to the health check",
                    )));
                }
                None if alive.elapsed() >= shared.config.health_interval => {
                    ping_sent = Some(self.ping(con)?);
                }
                _ => {}
            }
            match poll(con) {
                Ok(()) => {}
                Err(e) if e.is_timeout() => {}
                Err(e) if e.is_io_error() || e.is_connection_dropped() => return Err(e),
                // An error reply (a subscription to a slot that just moved, an ACL
                // refusal): logged, counted, and the slot map is read again.
                Err(e) => {
                    self.subscribe_error(&e);
                    shared.refresh_asked.store(true, Ordering::Release);
                }
            }
            if self.drain()? {
                ping_sent = None;
                alive = Instant::now();
                if !up {
                    up = true;
                    link.connected(shared);
                }
            }
        }
    }

    /// A channel no topic uses, in a slot this node serves (any, for a single Redis).
    fn health_channel(&self) -> String {
        let shared = self.shared;
        let prefix = &shared.config.prefix;
        if shared.seeds.is_empty() {
            return format!("{prefix}\0");
        }
        let topology = shared.topology();
        (0..100_000u32)
            .map(|n| format!("{prefix}{{\0{n}}}"))
            .find(|channel| topology.owner(cluster::slot(channel.as_bytes())) == Some(self.addr))
            .unwrap_or_else(|| format!("{prefix}{{\0}}"))
    }

    /// Subscribes to the health channel again; the confirmation is the answer.
    fn ping(&mut self, con: &mut redis::Connection) -> RedisResult<Instant> {
        let packed = redis::cmd(self.shared.commands().subscribe)
            .arg(&self.health)
            .get_packed_command();
        con.send_packed_command(&packed)?;
        Ok(Instant::now())
    }

    /// Hands over what Redis pushed; true when the health check was answered.
    fn drain(&mut self) -> RedisResult<bool> {
        let commands = self.shared.commands();
        let mut answered = false;
        while let Ok(push) = self.pushes.try_recv() {
            let kind = push.kind;
            let mut data = push.data.into_iter();
            let channel = match data.next() {
                Some(Value::BulkString(b)) => String::from_utf8(b).ok(),
                _ => None,
            };
            if kind == PushKind::Disconnection {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the connection closed",
                )));
            }
            let Some(channel) = channel else {
                continue;
            };
            if kind == commands.message {
                if let Some(Value::BulkString(payload)) = data.next() {
                    self.deliver(&channel, &payload);
                }
            } else if kind == commands.subscribed {
                answered |= channel == self.health;
            } else if kind == commands.unsubscribed {
                if channel == self.health {
                    self.health_moved = true;
                    self.shared.refresh_asked.store(true, Ordering::Release);
                    continue;
                }
                // Ours are gone from `subscribed` already: this one Redis dropped (its
                // slot moved). Subscribed again where it is served now.
                let Some(topic) = self.shared.topic_of(&channel) else {
                    continue;
                };
                if self.subscribed.remove(&*topic) {
                    self.shared
                        .metrics
                        .subscriptions
                        .fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!(addr = %self.addr, %topic, "Redis broker: unsubscribed by the node (slot moved)");
                    self.shared.refresh_asked.store(true, Ordering::Release);
                    self.wants.changed.store(true, Ordering::Release);
                }
            }
        }
        Ok(answered)
    }

    /// Brings this connection's subscriptions in line with the wanted topics, in one
    /// write (the confirmations come as pushes).
    fn sync(&mut self, con: &mut redis::Connection) -> RedisResult<()> {
        let shared = self.shared;
        let commands = shared.commands();
        let (add, remove): (Vec<String>, Vec<String>) = {
            let wanted = lock(&self.wants.set);
            (
                wanted
                    .iter()
                    .filter(|t| !self.subscribed.contains(*t))
                    .cloned()
                    .collect(),
                self.subscribed
                    .iter()
                    .filter(|t| !wanted.contains(*t))
                    .cloned()
                    .collect(),
            )
        };
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let mut packed = Vec::new();
        // Never an empty UNSUBSCRIBE: that would drop every subscription.
        for (command, topics) in [(commands.subscribe, &add), (commands.unsubscribe, &remove)] {
            // A sharded command takes channels of one slot only.
            let mut by_slot: HashMap<u16, Vec<String>> = HashMap::new();
            for topic in topics {
                let channel = shared.channel(topic);
                let slot = if shared.seeds.is_empty() {
                    0
                } else {
                    cluster::slot(channel.as_bytes())
                };
                by_slot.entry(slot).or_default().push(channel);
            }
            for channels in by_slot.values() {
                for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
                    packed.extend(redis::cmd(command).arg(chunk).get_packed_command());
                }
            }
        }
        con.send_packed_command(&packed)?;
        let before = self.subscribed.len();
        self.subscribed.extend(add);
        for topic in &remove {
            self.subscribed.remove(topic);
        }
        let after = self.subscribed.len();
        let metric = &shared.metrics.subscriptions;
        if after >= before {
            metric.fetch_add((after - before) as u64, Ordering::Relaxed);
        } else {
            metric.fetch_sub((before - after) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The connection is gone, and its subscriptions with it.
    fn unsubscribed_all(&mut self) {
        self.shared
            .metrics
            .subscriptions
            .fetch_sub(self.subscribed.len() as u64, Ordering::Relaxed);
        self.subscribed.clear();
    }

    /// Hands a message from another process to the sink; drops our own and late ones,
    /// counts what is not our envelope.
    fn deliver(&mut self, channel: &str, bytes: &[u8]) {
        let shared = self.shared;
        let Some(topic) = shared.topic_of(channel) else {
            self.malformed(channel, "channel without our prefix");
            return;
        };
        if !self.subscribed.contains(&*topic) {
            // Sent before our UNSUBSCRIBE took effect: nobody here wants it any more.
            return;
        }
        let topic = topic.into_owned();
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
            let lane = if shared.seeds.is_empty() {
                ""
            } else {
                topic.as_str()
            };
            if !own && !lock(self.seen).fresh(envelope.origin, lane, seq) {
                shared.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if !own {
            shared.metrics.received.fetch_add(1, Ordering::Relaxed);
        }
        let inbound = Inbound {
            topic: topic.clone(),
            kind: envelope.kind,
            payload: Bytes::copy_from_slice(envelope.payload),
            position: position.map(|(offset, epoch)| (offset, epoch.into())),
            own,
        };
        self.hand_over(&topic, inbound);
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
        let entries = report::gap_fill(
            NAME,
            &shared.metrics,
            &inbound.topic,
            (after, offset - 1),
            filled.map(|snapshot| snapshot.entries),
        );
        for entry in entries {
            let _ = self.sink(topic, entry);
        }
        // Taken now, whatever is still missing.
        let _ = self.sink(topic, inbound);
    }

    /// Calls the sink, which is the pubsub layer's: should it panic, this thread
    /// carries on.
    fn sink(&self, topic: &str, inbound: Inbound) -> Option<Accepted> {
        report::deliver(NAME, &self.shared.sink, topic, inbound)
    }

    /// An error reply on the connection: to a subscription command (nothing else is
    /// sent on it). Counted in `subscribe_errors` and logged (at most one line a
    /// second) with this shard's node and the channels concerned: those of ours in the
    /// slot a redirect names, else what the error says (an ACL refusal names its
    /// channel). The topics of a moved slot are subscribed again where it is served
    /// once the slot map is read again; a refused one stays unsubscribed here.
    fn subscribe_error(&mut self, error: &redis::RedisError) {
        let shared = self.shared;
        if error
            .redirect_node()
            .is_some_and(|(_, slot)| slot == cluster::slot(self.health.as_bytes()))
        {
            // The health check's own slot moved: not an error of ours to count.
            self.health_moved = true;
            return;
        }
        shared
            .metrics
            .subscribe_errors
            .fetch_add(1, Ordering::Relaxed);
        let Some(suppressed) = self.subscribe_error_log.check() else {
            return;
        };
        let channels = match error.redirect_node() {
            Some((_, slot)) => {
                let mut channels: Vec<String> = self
                    .subscribed
                    .iter()
                    .map(|topic| shared.channel(topic))
                    .filter(|channel| cluster::slot(channel.as_bytes()) == slot)
                    .collect();
                channels.sort_unstable();
                channels.truncate(8);
                format!("{channels:?}")
            }
            None => "named in the error, if any".to_owned(),
        };
        tracing::warn!(
            addr = %self.addr,
            channels = %channels,
            "Redis broker: the subscriber's node answered a subscription with an error: \
             {error}; reading the slot map again ({suppressed} more such lines held back)"
        );
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
        report::malformed(
            NAME,
            &self.shared.metrics,
            &self.malformed_log,
            channel,
            &cause,
        );
    }
}

/// Reads from the connection until a message or a pushed reply arrives (each goes to
/// the push sender), or the read timeout.
fn poll(con: &mut redis::Connection) -> RedisResult<()> {
    // Not dropped: a `PubSub` that drops sends `UNSUBSCRIBE`s. It holds nothing of
    // its own here (it buffers only what its own commands read).
    let mut pubsub = ManuallyDrop::new(con.as_pubsub());
    pubsub.get_message().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_number_at_or_below_the_highest_seen_is_a_duplicate() {
        let mut seen = Seen::default();
        let (a, b) = ([1; 16], [2; 16]);
        assert!(seen.fresh(a, "", 1));
        assert!(seen.fresh(a, "", 2));
        // Gaps are messages of topics this process does not listen to.
        assert!(seen.fresh(a, "", 10));
        // Each origin counts on its own.
        assert!(seen.fresh(b, "", 3));
        // A batch resent from 2: all but the new ones are dropped, in order.
        for seq in [2, 3, 9, 10] {
            assert!(!seen.fresh(a, "", seq), "{seq}");
        }
        assert!(seen.fresh(a, "", 11));
        assert!(!seen.fresh(b, "", 3));
        // Each lane (a topic, on a cluster) counts on its own: a message redirected
        // to another node arrives after later ones of other topics.
        assert!(seen.fresh(a, "x", 5));
        assert!(seen.fresh(a, "y", 4));
        assert!(!seen.fresh(a, "x", 5));
    }

    #[test]
    fn the_memory_of_origins_is_bounded() {
        let mut seen = Seen::default();
        for i in 0..MAX_ORIGINS + 10 {
            let mut origin = [0; 16];
            origin[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(seen.fresh(origin, "", 5));
        }
        assert!(seen.highest.len() <= MAX_ORIGINS);
        let origin = [9; 16];
        for i in 0..MAX_LANES + 10 {
            assert!(seen.fresh(origin, &format!("t{i}"), 1));
        }
        assert!(seen.lanes <= MAX_LANES);
    }
}
