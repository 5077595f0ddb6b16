//! The Redis Pub/Sub broker (see the module docs of [`crate::broker`] for the contract).
//!
//! Each process holds two Redis connections (three with the history reader), each on
//! its own OS thread, never on an I/O core (with Redis Cluster, one of each per master:
//! see `redis/cluster.rs` and [`RedisConfig::cluster`]):
//!
//! - the **subscriber** (thread `ringsocket-rsub`): `SUBSCRIBE`s to `prefix + topic` for
//!   every topic this process wants, receives messages and hands them to the
//!   [`BrokerSink`]. It reads with a short timeout ([`POLL_INTERVAL`]) so that it also
//!   applies subscription changes and notices shutdown without a second wake-up channel.
//! - the **publisher** (thread `ringsocket-rpub`): drains the bounded publish queue and
//!   sends everything queued in one pipelined batch of `PUBLISH`es per round trip.
//!
//! The I/O cores only `try_send` into the publish queue (a bounded `crossbeam-channel`)
//! and touch a small mutex-guarded set of wanted topics on subscribe/unsubscribe: they
//! never wait for Redis.
//!
//! Messages travel in a binary envelope (`redis/envelope.rs`) carrying a random
//! per-process origin id, so a process drops its own messages when Redis echoes them
//! back (it delivered them locally already): every subscriber gets each message exactly
//! once. Each envelope also carries the process's sequence number of the message, and
//! a receiver drops a number at or below the highest it has seen from that process: a
//! batch sent again after a broken connection is not delivered twice.
//!
//! When Redis goes away, each thread logs one line naming the cause, counts it, and
//! reconnects with exponential backoff and jitter ([`RedisConfig::backoff_min`] to
//! [`RedisConfig::backoff_max`]); the subscriber resubscribes to every wanted topic.
//! An idle connection is checked with a `PING` every [`RedisConfig::health_interval`],
//! so a silent loss is noticed too.
//!
//! # The backlog: nothing lost while Redis is away
//!
//! Every message [`Broker::publish`] takes stays in the **backlog** until Redis has
//! acknowledged its `PUBLISH`: queued, in the batch being sent, or waiting for Redis to
//! come back. The backlog is bounded by [`RedisConfig::publish_queue`] messages and
//! [`RedisConfig::publish_queue_bytes`] payload bytes (`redis_backlog_messages` and
//! `redis_backlog_bytes` for `ringsocket serve`); a publish that does not fit is
//! refused ([`Refused::BacklogFull`]) before anyone gets it, counted in
//! `ringsocket_broker_backlog_full_total` (and `..._publish_failed_total`) and logged
//! at most once a second with the cause (Redis unreachable, or not keeping up).
//! `ringsocket_broker_backlog_messages` and `..._backlog_bytes` show how full it is.
//!
//! While Redis is away the publisher takes nothing out of the queue. A batch whose
//! send failed is kept as it was encoded and sent again, first, on the next
//! connection; everything after it follows in publish order.
//!
//! Duplicates: a batch that failed may have been partly executed by Redis before the
//! connection broke, so resending it is *at least once* towards Redis. Each envelope
//! carries a per-process sequence number, and a receiving process drops any number at
//! or below the highest it has seen from that process (`..._duplicates_total`): each
//! message reaches each listening process **exactly once, in order**. (The receiver's
//! memory is bounded to 1,024 processes; past it, it starts over.)
//!
//! Redis Pub/Sub keeps nothing for a subscriber that is not connected. So after a
//! loss, the publisher does not flush the backlog into a Redis that the other processes
//! have not resubscribed to yet: it remembers how many subscribers Redis reported for
//! each topic at its last `PUBLISH` (up to 4,096 topics), and before sending a batch it
//! waits, with `PUBSUB NUMSUB`, until each topic of the batch is back to that count,
//! for at most [`RedisConfig::backoff_max`] + [`RedisConfig::io_timeout`] after it
//! reconnected (the longest a healthy process takes to retry and resubscribe). A
//! process that comes back later than that misses what was sent before it returned,
//! as it would any message published while it is away; that wait is logged.
//!
//! What is still lost: the backlog at shutdown (counted in `publish_failed`, logged),
//! a publish refused while the backlog is full (the caller is told), and a message
//! Redis accepted while a receiving process's own subscriber connection was down.
//!
//! A message from another process whose payload is larger than
//! [`RedisConfig::max_payload`] (the server's `max_message_size`) is dropped, counted
//! and logged, like one that is not our envelope: nothing reaches a client that the
//! client could not have sent. (Redis itself disconnects a subscriber whose pending
//! output passes `client-output-buffer-limit pubsub`, 32 MiB by default; the broker
//! then reconnects.)
//!
//! The client is the `redis` crate's synchronous API (no async runtime): `PubSub` with a
//! read timeout on the subscriber, `redis::pipe()` on the publisher.

mod cluster;
mod history;
mod publisher;
mod subscriber;

pub use history::StreamHistory;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

pub use super::BrokerError;
use super::BrokerName;
use super::backlog::{Backlog, Outbound, QueueFailed, RateLimit};
use super::envelope;
use super::{Ack, Broker, BrokerMetrics, BrokerSink, HistoryReply, Kind, Refused};
use crate::config::{Config, mask_url_password};
use cluster::Topology;
use envelope::Origin;

/// The broker named in this module's errors.
const NAME: BrokerName = BrokerName::Redis;

/// How often the subscriber thread wakes up when no message arrives, to apply
/// subscription changes and to notice shutdown: the longest a new subscription waits
/// before it is sent to Redis.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Settings of the Redis broker. Build with [`RedisConfig::new`], then change fields.
/// Its `Debug` shows the URL with its passwords masked.
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (or `redis+unix:///path`). No default.
    pub url: String,
    /// Prepended to every topic to name its Redis channel. Default `"ringsocket:"`.
    pub prefix: String,
    /// The backlog's bound in messages: published here and not yet acknowledged by
    /// Redis (queued, being sent, or held while Redis is away; see the module docs).
    /// Beyond it `publish` refuses the message ([`Refused::BacklogFull`]), counts it in
    /// `backlog_full` and `publish_failed` and logs at most one line a second.
    /// `redis_backlog_messages` for `ringsocket serve`. Default 65,536.
    pub publish_queue: usize,
    /// The backlog's bound in payload bytes; beyond it the same as
    /// [`RedisConfig::publish_queue`]. A message larger than this is always refused.
    /// `redis_backlog_bytes` for `ringsocket serve`. Default 64 MiB.
    pub publish_queue_bytes: usize,
    /// First wait before reconnecting after a failed attempt. Default 100 ms.
    pub backoff_min: Duration,
    /// Longest wait between reconnection attempts (each wait doubles up to it, with
    /// jitter). Default 5 s.
    pub backoff_max: Duration,
    /// Longest wait for a connection, a reply or a write before the connection is taken
    /// as lost. Default 2 s.
    pub io_timeout: Duration,
    /// An idle connection is checked with a `PING` this often. Default 1 s.
    pub health_interval: Duration,
    /// Largest payload taken from another process, in bytes. A bigger message is
    /// dropped, counted in `ringsocket_broker_oversized_total` and logged (at most one
    /// line a second). Default 1 MiB; [`RedisConfig::from_config`] uses the server's
    /// `max_message_size`, the largest message a client may send it.
    pub max_payload: usize,
    /// Offsets, epochs and history at Redis (see `history`): every process numbers a
    /// topic's publications alike, and a `ringsocket.v1` client recovers on any of
    /// them. `None` (the default of [`RedisConfig::new`]): plain Pub/Sub, each process
    /// numbers its own; [`RedisConfig::from_config`] sets it from `history_size` and
    /// `history_ttl_secs`.
    pub history: Option<StreamHistory>,
    /// Redis Cluster (`redis_cluster`): [`RedisConfig::url`] lists one or more seed
    /// nodes, comma-separated (`redis://:pw@h1:7000,h2:7000`: a seed without a scheme
    /// takes the first one's user and password). Each topic's channel and keys share
    /// one hash tag; messages travel with sharded Pub/Sub (`SPUBLISH`, `SSUBSCRIBE`,
    /// Redis 7 or later), one subscriber connection per master. Default false.
    pub cluster: bool,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &mask_url_password(&self.url))
            .field("prefix", &self.prefix)
            .field("publish_queue", &self.publish_queue)
            .field("publish_queue_bytes", &self.publish_queue_bytes)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("io_timeout", &self.io_timeout)
            .field("health_interval", &self.health_interval)
            .field("max_payload", &self.max_payload)
            .field("history", &self.history)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl RedisConfig {
    /// The defaults, for the Redis server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "ringsocket:".to_owned(),
            publish_queue: 65_536,
            publish_queue_bytes: 64 << 20,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            health_interval: Duration::from_secs(1),
            max_payload: 1 << 20,
            history: None,
            cluster: false,
        }
    }

    /// The broker settings of a server configuration: `None` when
    /// [`Config::redis_url`] is empty (the embedded broker only).
    pub fn from_config(config: &Config) -> Option<Self> {
        if config.redis_url.is_empty() {
            return None;
        }
        let mut redis = Self::new(config.redis_url.clone());
        redis.prefix.clone_from(&config.redis_prefix);
        redis.publish_queue = config.redis_backlog_messages;
        redis.publish_queue_bytes = config.redis_backlog_bytes;
        redis.max_payload = config.max_message_size;
        redis.cluster = config.redis_cluster;
        redis.history = Some(StreamHistory {
            size: config.history_size,
            ttl: Duration::from_secs(config.history_ttl_secs),
        });
        Some(redis)
    }
}

/// Checks that `url` is a Redis URL this build can connect to, without connecting.
pub fn check_url(url: &str) -> Result<(), BrokerError> {
    client(url).map(drop)
}

fn client(url: &str) -> Result<redis::Client, BrokerError> {
    redis::Client::open(url)
        .map_err(|e| BrokerError::InvalidUrl(NAME, format!("{:?}: {e}", mask_url_password(url))))
}

/// The seed nodes of a Redis Cluster `url`: comma-separated, each a URL or a bare
/// `host:port` that takes the first one's scheme, user and password. TCP only.
fn seeds(url: &str) -> Result<Vec<redis::ConnectionInfo>, BrokerError> {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let invalid = |e: String| BrokerError::InvalidUrl(NAME, e);
    let mut seeds: Vec<redis::ConnectionInfo> = Vec::new();
    for item in url.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(invalid(format!(
                "{:?}: an empty seed node",
                mask_url_password(url)
            )));
        }
        let info = match seeds.first() {
            Some(first) if !item.contains("://") => {
                let (host, port) = cluster::split_addr(item).ok_or_else(|| {
                    invalid(format!(
                        "seed {:?} is not host:port",
                        mask_url_password(item)
                    ))
                })?;
                first
                    .clone()
                    .set_addr(ConnectionAddr::Tcp(host.to_owned(), port))
            }
            _ => client(item)?.get_connection_info().clone(),
        };
        if !matches!(info.addr(), ConnectionAddr::Tcp(..)) {
            return Err(invalid(format!(
                "seed {:?}: Redis Cluster nodes are reached over TCP (redis://host:port)",
                mask_url_password(item)
            )));
        }
        seeds.push(
            info.into_connection_info()
                .map_err(|e| invalid(e.to_string()))?,
        );
    }
    Ok(seeds)
}

/// `host:port` of a TCP connection, else how it is shown in log lines.
fn addr_of(info: &redis::ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => cluster::join_addr(host, *port),
        other => other.to_string(),
    }
}

/// The Redis Pub/Sub broker. See the module docs.
pub struct RedisBroker {
    shared: Arc<Shared>,
    queue: Sender<Outbound>,
    /// Questions for the reader thread (with [`RedisConfig::history`]).
    reads: Sender<history::Read>,
    /// Dropped by [`Broker::shutdown`]: disconnecting it wakes both threads.
    stop: Mutex<Option<Sender<()>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("addr", &self.shared.addr)
            .field("prefix", &self.shared.config.prefix)
            .field("backlog", &self.queued())
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Starts the subscriber and publisher threads. Fails only for an invalid URL or
    /// setting (or if the OS refuses a thread): Redis being down is logged and retried
    /// in the background.
    pub fn start(config: RedisConfig, sink: BrokerSink) -> Result<Arc<Self>, BrokerError> {
        let seeds = if config.cluster {
            if config.prefix.contains(['{', '}']) {
                return Err(BrokerError::InvalidConfig(
                    NAME,
                    format!(
                        "the prefix {:?} holds a brace: with Redis Cluster it would be the \
                     hash tag of every topic",
                        config.prefix
                    ),
                ));
            }
            seeds(&config.url)?
        } else {
            Vec::new()
        };
        let client = match seeds.first() {
            Some(first) => redis::Client::open(first.clone())
                .map_err(|e| BrokerError::InvalidUrl(NAME, e.to_string()))?,
            None => client(&config.url)?,
        };
        super::error::check_nonzero(
            NAME,
            (config.publish_queue, config.publish_queue_bytes),
            &[
                ("backoff_min", config.backoff_min),
                ("backoff_max", config.backoff_max),
                ("io_timeout", config.io_timeout),
                ("health_interval", config.health_interval),
            ],
        )?;
        let origin = envelope::random_origin(NAME)?;
        let addr = if seeds.is_empty() {
            addr_of(client.get_connection_info())
        } else {
            format!(
                "cluster {}",
                seeds.iter().map(addr_of).collect::<Vec<_>>().join(",")
            )
        };
        let topology = if seeds.is_empty() {
            Topology::single(&addr)
        } else {
            Topology::default()
        };
        let (queue, queue_rx) = crossbeam_channel::bounded(config.publish_queue);
        let (stop, stop_rx) = crossbeam_channel::bounded(0);
        let (reads, reads_rx) = crossbeam_channel::bounded(MAX_READS);
        let with_history = config.history.is_some();
        let backlog = Backlog::new("Redis", config.publish_queue, config.publish_queue_bytes);
        let shared = Arc::new(Shared {
            config,
            client,
            addr,
            origin,
            sink,
            metrics: BrokerMetrics::default(),
            wants: Wants::default(),
            stopping: AtomicBool::new(false),
            links: Mutex::new([false, false, !with_history]),
            subscriber_links: Mutex::new(HashMap::new()),
            seeds,
            topology: RwLock::new(Arc::new(topology)),
            generation: AtomicU64::new(0),
            refresh_asked: AtomicBool::new(false),
            backlog,
        });
        let broker = Arc::new(Self {
            shared: shared.clone(),
            queue,
            reads,
            stop: Mutex::new(Some(stop)),
            threads: Mutex::new(Vec::new()),
        });
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(run)
                .map_err(|e| BrokerError::Os(NAME, e))
        };
        let sub_shared = shared.clone();
        let sub_stop = stop_rx.clone();
        let sub_reads = broker.reads.clone();
        if with_history {
            let (read_shared, read_stop) = (shared.clone(), stop_rx.clone());
            match spawn(
                "ringsocket-rhist",
                Box::new(move || history::run(&read_shared, &reads_rx, &read_stop)),
            ) {
                Ok(reader) => lock(&broker.threads).push(reader),
                Err(e) => {
                    broker.shutdown();
                    return Err(e);
                }
            }
        }
        let started = spawn(
            "ringsocket-rsub",
            Box::new(move || subscriber::run(&sub_shared, &sub_stop, &sub_reads)),
        )
        .and_then(|sub| {
            lock(&broker.threads).push(sub);
            spawn(
                "ringsocket-rpub",
                Box::new(move || publisher::run(&shared, &queue_rx, &stop_rx)),
            )
        });
        match started {
            Ok(publ) => lock(&broker.threads).push(publ),
            Err(e) => {
                broker.shutdown();
                return Err(e);
            }
        }
        Ok(broker)
    }

    /// Messages in the backlog: published here and not yet acknowledged by Redis (at
    /// most [`RedisConfig::publish_queue`]).
    pub fn queued(&self) -> usize {
        usize::try_from(self.shared.metrics.backlog_messages.load(Ordering::Relaxed))
            .unwrap_or(usize::MAX)
    }

    /// Takes a publication into the backlog (room first), with its ack if any.
    fn enqueue(
        &self,
        topic: &str,
        kind: Kind,
        payload: Bytes,
        ack: Option<Ack>,
    ) -> Result<(), Refused> {
        let shared = &self.shared;
        shared.backlog.take(
            &shared.metrics,
            shared.stopping(),
            (topic, kind, payload),
            ack,
            |message| {
                self.queue.try_send(message).map_err(|e| match e {
                    TrySendError::Full(message) => QueueFailed::Full(message),
                    TrySendError::Disconnected(message) => QueueFailed::Closed(message),
                })
            },
            || lock(&shared.links)[Link::Publisher as usize],
            &shared.addr,
        )
    }
}

impl Broker for RedisBroker {
    fn publish(&self, topic: &str, kind: Kind, payload: Bytes) -> Result<(), Refused> {
        self.enqueue(topic, kind, payload, None)
    }

    fn sequences(&self) -> bool {
        self.shared.config.history.is_some()
    }

    fn publish_acked(
        &self,
        topic: &str,
        kind: Kind,
        payload: Bytes,
        ack: Ack,
    ) -> Result<(), Refused> {
        self.enqueue(topic, kind, payload, Some(ack))
    }

    fn history(&self, topic: &str, since: u64, limit: usize, reply: HistoryReply) {
        if !self.sequences() {
            return reply(Err(
                "this broker keeps no history (RedisConfig::history)".into()
            ));
        }
        let read = history::Read {
            topic: topic.to_owned(),
            after: since,
            upto: None,
            limit,
            reply,
        };
        if let Err(e) = self.reads.try_send(read) {
            let read = e.into_inner();
            (read.reply)(Err("the Redis history reader is busy or stopped".into()));
        }
    }

    fn subscribe(&self, topic: &str) {
        self.shared.wants.change(|set| set.insert(topic.to_owned()));
    }

    fn unsubscribe(&self, topic: &str) {
        self.shared.wants.change(|set| set.remove(topic));
    }

    fn metrics(&self) -> &BrokerMetrics {
        &self.shared.metrics
    }

    fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        drop(lock(&self.stop).take());
        let threads = std::mem::take(&mut *lock(&self.threads));
        let me = std::thread::current().id();
        for handle in threads {
            // The sink runs on the subscriber thread: it cannot join itself.
            if handle.thread().id() != me {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Questions the reader thread may hold before `history` answers "busy".
const MAX_READS: usize = 16_384;

/// A random generator seeded from the process's origin id.
fn seeded_rng(origin: &Origin) -> ChaCha8Rng {
    let mut seed = [0; 32];
    seed[..envelope::ORIGIN_LEN].copy_from_slice(origin);
    let mut extra = [0u8; 16];
    if getrandom::fill(&mut extra).is_ok() {
        seed[envelope::ORIGIN_LEN..].copy_from_slice(&extra);
    }
    ChaCha8Rng::from_seed(seed)
}

/// Topics wanted at Redis, and whether they changed since a subscriber connection
/// last applied them.
#[derive(Default)]
struct Wants {
    set: Mutex<HashSet<String>>,
    changed: AtomicBool,
    /// Set when the connection that applies them is no longer needed (its node no
    /// longer serves slots).
    retired: AtomicBool,
}

impl Wants {
    /// Changes the set; `change` answers whether it changed anything.
    fn change(&self, change: impl FnOnce(&mut HashSet<String>) -> bool) {
        if change(&mut lock(&self.set)) {
            self.changed.store(true, Ordering::Release);
        }
    }

    /// Whether the set changed since the last call (and forgets that it did).
    fn take_changed(&self) -> bool {
        // A plain load first: this runs once per message.
        self.changed.load(Ordering::Relaxed) && self.changed.swap(false, Ordering::AcqRel)
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }
}

/// What the threads share with the broker handle.
struct Shared {
    config: RedisConfig,
    /// The Redis server, or the first seed node of a cluster.
    client: redis::Client,
    /// `host:port` (or socket path) for log lines: the URL may hold a password. For a
    /// cluster, `cluster` and the seeds.
    addr: String,
    origin: Origin,
    sink: BrokerSink,
    metrics: BrokerMetrics,
    /// Topics this process has local subscribers to. Changed by the I/O cores (short
    /// critical sections), applied to Redis by the subscriber thread(s).
    wants: Wants,
    stopping: AtomicBool,
    /// Whether each [`Link`] is connected; `connected` is 1 while all are.
    links: Mutex<[bool; 3]>,
    /// Whether each subscriber connection (one per master of a cluster) is up.
    /// By [`LinkState::id`]: a retired connection's thread that ends after a new one
    /// to the same node started does not touch the new one's entry.
    subscriber_links: Mutex<HashMap<u64, bool>>,
    /// The seed nodes of a cluster; empty for a single Redis.
    seeds: Vec<redis::ConnectionInfo>,
    /// Which node serves each slot (one node for a single Redis).
    topology: RwLock<Arc<Topology>>,
    /// Bumped at each change of `topology`.
    generation: AtomicU64,
    /// Set by a thread that saw the topology change (a redirect, a lost node): the
    /// subscriber thread reads it again.
    refresh_asked: AtomicBool,
    backlog: Backlog,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Counts `n` messages that could not be forwarded.
    fn failed(&self, n: u64) {
        Backlog::failed(&self.metrics, n);
    }

    /// Gives back the room of `messages` messages of `bytes` payload bytes in all:
    /// acknowledged by Redis, or abandoned at shutdown.
    fn release(&self, messages: u64, bytes: u64) {
        Backlog::release(&self.metrics, messages, bytes);
    }

    /// The Redis channel of `topic`, written into `out`: `prefix + topic`, or with
    /// Redis Cluster `prefix + "{" + tag + "}"` (see `cluster::tag`). The topic's keys
    /// are its channel + `":"` + their kind.
    fn channel_into(&self, topic: &str, out: &mut String) {
        out.clear();
        out.push_str(&self.config.prefix);
        if self.config.cluster {
            out.push('{');
            cluster::tag(topic, out);
            out.push('}');
        } else {
            out.push_str(topic);
        }
    }

    /// The channel of `topic`.
    fn channel(&self, topic: &str) -> String {
        let mut channel = String::new();
        self.channel_into(topic, &mut channel);
        channel
    }

    /// The key `kind` of `topic`: its channel + `":"` + `kind`, so no two topics share
    /// a key, and with Redis Cluster all of a topic's keys are in its channel's slot.
    fn key(&self, topic: &str, kind: &str) -> String {
        let mut key = self.channel(topic);
        key.push(':');
        key.push_str(kind);
        key
    }

    /// The topic of a channel of ours; `None` for any other channel.
    fn topic_of<'c>(&self, channel: &'c str) -> Option<std::borrow::Cow<'c, str>> {
        let rest = channel.strip_prefix(self.config.prefix.as_str())?;
        if !self.config.cluster {
            return Some(rest.into());
        }
        let tag = rest.strip_prefix('{')?.strip_suffix('}')?;
        cluster::untag(tag).map(Into::into)
    }

    /// The node serving `channel`'s slot (the one Redis, without a cluster).
    fn owner(&self, channel: &str) -> Option<String> {
        let topology = self.topology();
        topology
            .owner(cluster::slot(channel.as_bytes()))
            .map(str::to_owned)
    }

    fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sharded Pub/Sub (`SPUBLISH`, `SSUBSCRIBE`) with a cluster, else plain.
    fn commands(&self) -> &'static Commands {
        if self.config.cluster {
            &SHARDED
        } else {
            &PLAIN
        }
    }

    /// Reads the cluster's slot map again (nothing to do for a single Redis), from
    /// the masters known, else the seeds; through `nodes`' connections. Counted in
    /// `topology_refreshes`; a change bumps [`Shared::generation`].
    fn refresh(&self, nodes: &mut Nodes) -> redis::RedisResult<()> {
        if self.seeds.is_empty() {
            return Ok(());
        }
        self.metrics
            .topology_refreshes
            .fetch_add(1, Ordering::Relaxed);
        let current = self.topology();
        let mut candidates: Vec<String> =
            current.masters().into_iter().map(str::to_owned).collect();
        candidates.extend(self.seeds.iter().map(addr_of));
        // Nodes with a connection open first: an unreachable master is not waited for
        // (a connection timeout) while another answers.
        candidates.sort_by_key(|addr| !nodes.cons.contains_key(addr));
        let mut last_error = None;
        for addr in candidates {
            let asked = cluster::split_addr(&addr)
                .map_or("", |(host, _)| host)
                .to_owned();
            let reply = nodes.get(self, &addr).and_then(|(con, _)| {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<redis::Value>(con)
            });
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    nodes.forget(&addr);
                    last_error = Some(e);
                    continue;
                }
            };
            let topology = match Topology::parse(&reply, &asked) {
                Ok(topology) => topology,
                Err(e) => {
                    last_error = Some(redis::RedisError::from((
                        redis::ErrorKind::UnexpectedReturnType,
                        "an unusable CLUSTER SLOTS reply",
                        e,
                    )));
                    continue;
                }
            };
            let mut guard = self
                .topology
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if **guard != topology {
                let uncovered = topology.uncovered();
                tracing::info!(
                    addr = %addr,
                    masters = topology.masters().len(),
                    uncovered,
                    "Redis broker: cluster slot map read"
                );
                if uncovered > 0 {
                    tracing::warn!(
                        "Redis broker: {uncovered} slots have no master; their topics wait"
                    );
                }
                *guard = Arc::new(topology);
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
            // Connections to nodes that are no longer masters (a failover, a node
            // removed) are closed.
            nodes.prune(&guard.masters());
            return Ok(());
        }
        Err(last_error.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "no seed node to ask"))
        }))
    }

    /// Takes a `MOVED` into account until the next refresh, and asks for one.
    fn moved(&self, slot: u16, addr: &str) {
        self.metrics.redirects.fetch_add(1, Ordering::Relaxed);
        // Read, changed and written under the write lock: a refresh or another
        // thread's move in between is not undone.
        let mut guard = self
            .topology
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.owner(slot) != Some(addr) {
            Arc::make_mut(&mut guard).moved(slot, addr);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        drop(guard);
        self.refresh_asked.store(true, Ordering::Release);
    }

    /// One connection attempt to `addr` (a node of the cluster, or the one Redis), with
    /// the I/O timeouts set; `resp3` for a subscriber.
    fn open(&self, addr: &str, resp3: bool) -> redis::RedisResult<redis::Connection> {
        let mut info = self.client.get_connection_info().clone();
        if !self.seeds.is_empty() {
            let Some((host, port)) = cluster::split_addr(addr) else {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "not a host:port",
                    addr.to_owned(),
                )));
            };
            info = info.set_addr(redis::ConnectionAddr::Tcp(host.to_owned(), port));
        }
        if resp3 {
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(settings);
        }
        let con = redis::Client::open(info)?
            .get_connection_with_timeout(self.config.io_timeout)
            .map_err(|e| if resp3 { resp3_refused(e) } else { e })?;
        con.set_read_timeout(Some(self.config.io_timeout))?;
        con.set_write_timeout(Some(self.config.io_timeout))?;
        Ok(con)
    }

    /// Tries `attempt` until it succeeds, with backoff between failed attempts; `wait`
    /// sleeps for the given time and answers false when the thread is to stop. `None`
    /// when stopping. The caller reports the link as connected
    /// ([`LinkState::connected`]) once it is ready.
    fn connect<T>(
        &self,
        link: &mut LinkState,
        mut attempt: impl FnMut() -> redis::RedisResult<T>,
        mut wait: impl FnMut(Duration) -> bool,
    ) -> Option<T> {
        loop {
            if self.stopping() {
                return None;
            }
            match attempt() {
                Ok(connected) => return Some(connected),
                Err(e) => {
                    link.attempt_failed(self, &e);
                    if !wait(link.backoff.next()) {
                        return None;
                    }
                }
            }
        }
    }

    /// The publisher's and the reader's connection step: reads the slot map (with a
    /// cluster) and connects to every master. `Err` when no node answers (or the one
    /// Redis is away); with a cluster, the masters that could not be reached (their
    /// shards wait, the others go on).
    fn reach(&self, nodes: &mut Nodes) -> redis::RedisResult<Vec<(String, redis::RedisError)>> {
        self.refresh(nodes)?;
        let mut unreachable = Vec::new();
        for master in self.topology().masters() {
            if let Err(e) = nodes.get(self, master) {
                if self.seeds.is_empty() {
                    return Err(e);
                }
                unreachable.push((master.to_owned(), e));
            }
        }
        Ok(unreachable)
    }

    /// Whether the publisher reaches every node it sends to (with a cluster, some may
    /// be away while the others go on).
    fn set_publisher_up(&self, up: bool) {
        let mut links = lock(&self.links);
        links[Link::Publisher as usize] = up;
        let all = links.iter().all(|&up| up);
        self.metrics
            .connected
            .store(u64::from(all), Ordering::Relaxed);
    }

    fn set_link(&self, link: &LinkState, up: bool) {
        let mut links = lock(&self.links);
        if let Link::Subscriber = link.link {
            let mut subscribers = lock(&self.subscriber_links);
            subscribers.insert(link.id, up);
            links[Link::Subscriber as usize] = subscribers.values().all(|&up| up);
        } else {
            links[link.link as usize] = up;
        }
        let all = links.iter().all(|&up| up);
        self.metrics
            .connected
            .store(u64::from(all), Ordering::Relaxed);
    }

    /// A subscriber connection is gone for good (its node serves no slot any more).
    fn drop_subscriber_link(&self, link: &LinkState) {
        let mut links = lock(&self.links);
        let mut subscribers = lock(&self.subscriber_links);
        subscribers.remove(&link.id);
        links[Link::Subscriber as usize] =
            !subscribers.is_empty() && subscribers.values().all(|&up| up);
        let all = links.iter().all(|&up| up);
        self.metrics
            .connected
            .store(u64::from(all), Ordering::Relaxed);
    }
}

/// The Pub/Sub commands of a single Redis or of a cluster (sharded).
struct Commands {
    publish: &'static str,
    subscribe: &'static str,
    unsubscribe: &'static str,
    numsub: &'static str,
    message: redis::PushKind,
    subscribed: redis::PushKind,
    unsubscribed: redis::PushKind,
}

const PLAIN: Commands = Commands {
    publish: "PUBLISH",
    subscribe: "SUBSCRIBE",
    unsubscribe: "UNSUBSCRIBE",
    numsub: "NUMSUB",
    message: redis::PushKind::Message,
    subscribed: redis::PushKind::Subscribe,
    unsubscribed: redis::PushKind::Unsubscribe,
};

const SHARDED: Commands = Commands {
    publish: "SPUBLISH",
    subscribe: "SSUBSCRIBE",
    unsubscribe: "SUNSUBSCRIBE",
    numsub: "SHARDNUMSUB",
    message: redis::PushKind::SMessage,
    subscribed: redis::PushKind::SSubscribe,
    unsubscribed: redis::PushKind::SUnsubscribe,
};

/// One thread's connections, by node (`host:port`; the one Redis has the broker's
/// address).
#[derive(Default)]
struct Nodes {
    cons: HashMap<String, redis::Connection>,
}

impl Nodes {
    /// The connection to `addr`, opened if there is none (then the flag is true).
    fn get(
        &mut self,
        shared: &Shared,
        addr: &str,
    ) -> redis::RedisResult<(&mut redis::Connection, bool)> {
        let fresh = !self.cons.contains_key(addr);
        if fresh {
            let con = shared.open(addr, false)?;
            self.cons.insert(addr.to_owned(), con);
        }
        let con = self
            .cons
            .get_mut(addr)
            .ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "no connection")))?;
        Ok((con, fresh))
    }

    /// Drops the connection to `addr` (it failed).
    fn forget(&mut self, addr: &str) {
        self.cons.remove(addr);
    }

    /// Keeps only the connections to `masters`.
    fn prune(&mut self, masters: &[&str]) {
        self.cons.retain(|addr, _| masters.contains(&addr.as_str()));
    }
}

/// One of the two connections.
#[derive(Debug, Clone, Copy)]
enum Link {
    Subscriber = 0,
    Publisher = 1,
    /// The history reader (only with [`RedisConfig::history`]).
    Reader = 2,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Self::Subscriber => "subscriber",
            Self::Publisher => "publisher",
            Self::Reader => "history reader",
        }
    }
}

/// A connection's history, for its log lines and counters.
struct LinkState {
    link: Link,
    /// Unique in the process: which connection's thread this is.
    id: u64,
    /// Where it connects, for log lines: the broker's address, or a subscriber's node.
    addr: String,
    backoff: Backoff,
    /// When the current outage began (`None` while connected or before the first
    /// connection), and whether it follows a loss (a reconnect) or the start.
    down_since: Option<(Instant, bool)>,
    up_since: Option<Instant>,
    failed_attempts: u64,
}

impl LinkState {
    fn new(link: Link, shared: &Shared) -> Self {
        Self::at(link, shared, &shared.addr)
    }

    /// A connection to `addr` (a subscriber's node).
    fn at(link: Link, shared: &Shared, addr: &str) -> Self {
        let mut seed = [0; 32];
        seed[..envelope::ORIGIN_LEN].copy_from_slice(&shared.origin);
        seed[31] = link as u8;
        seed[30] = cluster::slot(addr.as_bytes()) as u8;
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Self {
            link,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            addr: addr.to_owned(),
            backoff: Backoff::new(
                shared.config.backoff_min,
                shared.config.backoff_max,
                ChaCha8Rng::from_seed(seed),
            ),
            down_since: Some((Instant::now(), false)),
            up_since: None,
            failed_attempts: 0,
        }
    }

    fn attempt_failed(&mut self, shared: &Shared, error: &redis::RedisError) {
        shared
            .metrics
            .connection_errors
            .fetch_add(1, Ordering::Relaxed);
        self.failed_attempts += 1;
        if self.failed_attempts == 1 && matches!(self.down_since, Some((_, false))) {
            tracing::warn!(
                addr = %self.addr,
                "Redis broker: {} cannot connect: {error}; retrying in the background",
                self.link.name()
            );
        } else {
            tracing::debug!(
                addr = %self.addr,
                "Redis broker: {} connection attempt failed: {error}",
                self.link.name()
            );
        }
    }

    fn connected(&mut self, shared: &Shared) {
        if let Some((since, after_loss)) = self.down_since.take() {
            if after_loss {
                shared.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    addr = %self.addr,
                    "Redis broker: {} reconnected after {:.1} s ({} failed attempts)",
                    self.link.name(),
                    since.elapsed().as_secs_f64(),
                    self.failed_attempts
                );
            } else if self.failed_attempts > 0 {
                tracing::info!(addr = %self.addr, "Redis broker: {} connected", self.link.name());
            }
        }
        self.failed_attempts = 0;
        self.up_since = Some(Instant::now());
        shared.set_link(self, true);
    }

    /// The connection was lost: one log line naming the cause.
    fn lost(&mut self, shared: &Shared, error: &redis::RedisError) {
        shared
            .metrics
            .connection_errors
            .fetch_add(1, Ordering::Relaxed);
        shared.set_link(self, false);
        tracing::warn!(
            addr = %self.addr,
            "Redis broker: {} connection lost: {error}; reconnecting",
            self.link.name()
        );
        // A connection that stayed up a while starts over from the shortest wait; one
        // that keeps failing right after connecting keeps backing off.
        if self
            .up_since
            .take()
            .is_some_and(|t| t.elapsed() >= shared.config.backoff_max)
        {
            self.backoff.reset();
        }
        self.down_since = Some((Instant::now(), true));
    }

    /// The thread is stopping.
    fn closed(&mut self, shared: &Shared) {
        shared.set_link(self, false);
    }
}

/// Exponential backoff with "equal jitter": each wait is half the current step plus a
/// random part up to the other half, and the step doubles up to the maximum.
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: ChaCha8Rng,
}

impl Backoff {
    fn new(min: Duration, max: Duration, rng: ChaCha8Rng) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            step: min,
            rng,
        }
    }

    fn next(&mut self) -> Duration {
        let half = self.step / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(self.rng.next_u64() % jitter_nanos.saturating_add(1));
        self.step = (self.step * 2).min(self.max);
        half + jitter
    }

    fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A subscriber connection's error, said plainly when the node refused `HELLO 3`: the
/// subscriber reads pushes in RESP3, which needs Redis 6 or later (Redis Cluster's
/// sharded Pub/Sub, Redis 7).
fn resp3_refused(error: redis::RedisError) -> redis::RedisError {
    if error.kind() != redis::ErrorKind::RESP3NotSupported {
        return error;
    }
    redis::RedisError::from((
        redis::ErrorKind::RESP3NotSupported,
        "the node refused HELLO 3: the subscriber speaks RESP3, which needs Redis 6 or \
         later (7 or later with redis_cluster, for sharded Pub/Sub)",
    ))
}

/// An error of ours, for a reply the broker cannot use.
fn redis_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits `timeout` on `stop`; false when the broker is stopping.
fn wait_unless_stopped(stop: &Receiver<()>, timeout: Duration) -> bool {
    !matches!(
        stop.recv_timeout(timeout),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut backoff = Backoff::new(min, max, ChaCha8Rng::from_seed([1; 32]));
        let mut step = min;
        for _ in 0..12 {
            let wait = backoff.next();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} for step {step:?}"
            );
            step = (step * 2).min(max);
        }
        assert_eq!(backoff.step, max);
        backoff.reset();
        assert!(backoff.next() <= min);
    }

    #[test]
    fn a_refused_hello_3_says_what_redis_is_needed() {
        let refused = resp3_refused(redis::RedisError::from((
            redis::ErrorKind::RESP3NotSupported,
            "Redis Server doesn't support HELLO command therefore resp3 cannot be used",
        )));
        assert!(
            refused.to_string().contains("Redis 6 or later"),
            "{refused}"
        );
        let other = resp3_refused(redis::RedisError::from((redis::ErrorKind::Io, "reset")));
        assert!(!other.to_string().contains("HELLO"), "{other}");
    }

    #[test]
    fn settings_come_from_the_server_config() {
        let mut config = Config::default();
        assert_eq!(RedisConfig::from_config(&config), None);
        config.redis_url = "redis://127.0.0.1:6380".into();
        config.redis_prefix = "app:".into();
        let redis = RedisConfig::from_config(&config).unwrap();
        assert_eq!(redis.url, "redis://127.0.0.1:6380");
        assert_eq!(redis.prefix, "app:");
        assert_eq!(redis.publish_queue, 65_536);
        assert_eq!(redis.publish_queue_bytes, 64 << 20);
        assert_eq!(redis.max_payload, 1 << 20);
        config.redis_backlog_messages = 10;
        config.redis_backlog_bytes = 1000;
        let redis = RedisConfig::from_config(&config).unwrap();
        assert_eq!((redis.publish_queue, redis.publish_queue_bytes), (10, 1000));
        config.max_message_size = 4096;
        assert_eq!(RedisConfig::from_config(&config).unwrap().max_payload, 4096);
    }

    #[test]
    fn start_refuses_only_bad_urls_and_settings() {
        let sink: BrokerSink = Arc::new(|_| crate::broker::Accepted::Delivered);
        for url in [
            "http://localhost",
            "redis://",
            "not a url",
            "rediss://localhost",
        ] {
            let err = RedisBroker::start(RedisConfig::new(url), sink.clone()).unwrap_err();
            assert!(
                matches!(err, BrokerError::InvalidUrl(BrokerName::Redis, _)),
                "{url}: {err}"
            );
        }
        // Redis Cluster: TCP seeds, a bare host:port takes the first's settings; no
        // brace in the prefix (it would be every topic's hash tag).
        let seeds = seeds("redis://:pw@127.0.0.1:1, 127.0.0.2:2,redis://[::1]:3").unwrap();
        let addrs: Vec<String> = seeds.iter().map(addr_of).collect();
        assert_eq!(addrs, ["127.0.0.1:1", "127.0.0.2:2", "[::1]:3"]);
        assert_eq!(seeds[1].redis_settings().password(), Some("pw"));
        for bad in [
            "redis://h:1,",
            "redis://h:1,nope",
            "redis+unix:///tmp/r.sock",
        ] {
            let mut config = RedisConfig::new(bad);
            config.cluster = true;
            let err = RedisBroker::start(config, sink.clone()).unwrap_err();
            assert!(
                matches!(err, BrokerError::InvalidUrl(BrokerName::Redis, _)),
                "{bad}: {err}"
            );
        }
        // No password in an error or in the settings' Debug, whichever seed is bad.
        for bad in [
            "redis://:s3cret@h:1,redis://:s3cret@h:2,",
            "redis://:s3cret@h:1,redis://u:s3cret@h:2,http://u:s3cret@h:3",
            "redis://:s3cret@h:1,u:s3cret@nope",
            "redis://u:s3cret@h:1,redis+unix://u:s3cret@/tmp/r.sock",
        ] {
            let mut config = RedisConfig::new(bad);
            config.cluster = true;
            assert!(!format!("{config:?}").contains("s3cret"), "{config:?}");
            let err = RedisBroker::start(config, sink.clone()).unwrap_err();
            assert!(
                matches!(err, BrokerError::InvalidUrl(BrokerName::Redis, _)),
                "{bad}: {err}"
            );
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        let err = check_url("http://u:s3cret@h:1").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.cluster = true;
        config.prefix = "{app}:".into();
        let err = RedisBroker::start(config, sink.clone()).unwrap_err();
        assert!(err.to_string().contains("brace"), "{err}");
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.publish_queue = 0;
        let err = RedisBroker::start(config, sink.clone()).unwrap_err();
        assert!(err.to_string().contains("publish_queue"), "{err}");
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.publish_queue_bytes = 4;
        let broker = RedisBroker::start(config, sink.clone()).unwrap();
        // Larger than the whole backlog: refused, nothing kept.
        assert_eq!(
            broker.publish("t", Kind::Binary, Bytes::from_static(b"12345")),
            Err(Refused::BacklogFull)
        );
        assert_eq!(broker.metrics().publish_failed.load(Ordering::Relaxed), 1);
        assert_eq!(broker.metrics().backlog_full.load(Ordering::Relaxed), 1);
        assert_eq!(broker.metrics().backlog_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(broker.queued(), 0);
        // Up to the bound it fits, beyond it not.
        assert_eq!(
            broker.publish("t", Kind::Binary, Bytes::from_static(b"123")),
            Ok(())
        );
        assert_eq!(
            broker.publish("t", Kind::Binary, Bytes::from_static(b"12")),
            Err(Refused::BacklogFull)
        );
        assert_eq!(
            broker.publish("t", Kind::Binary, Bytes::from_static(b"4")),
            Ok(())
        );
        assert_eq!(broker.metrics().backlog_bytes.load(Ordering::Relaxed), 4);
        assert_eq!(broker.metrics().backlog_full.load(Ordering::Relaxed), 2);
        broker.shutdown();
        // What was held is given up at shutdown, and counted.
        assert_eq!(broker.metrics().publish_failed.load(Ordering::Relaxed), 4);
        assert_eq!(broker.metrics().backlog_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(
            broker.publish("t", Kind::Binary, Bytes::from_static(b"1")),
            Err(Refused::Stopped)
        );
        assert_eq!(broker.metrics().publish_failed.load(Ordering::Relaxed), 5);
        // Nothing listens on port 1: start still succeeds and keeps retrying; what is
        // published meanwhile waits in the backlog, up to its bound.
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.publish_queue = 1;
        let broker = RedisBroker::start(config, sink).unwrap();
        assert_eq!(
            broker.publish("t", Kind::Text, Bytes::from_static(b"a")),
            Ok(())
        );
        for refused in [b"b", b"c"] {
            assert_eq!(
                broker.publish("t", Kind::Text, Bytes::from_static(refused)),
                Err(Refused::BacklogFull)
            );
        }
        assert_eq!(broker.queued(), 1);
        assert_eq!(broker.metrics().backlog_messages.load(Ordering::Relaxed), 1);
        let started = Instant::now();
        broker.shutdown();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(broker.metrics().connected.load(Ordering::Relaxed), 0);
        // Two refused, one abandoned at shutdown.
        assert_eq!(broker.metrics().publish_failed.load(Ordering::Relaxed), 3);
        assert_eq!(broker.metrics().backlog_full.load(Ordering::Relaxed), 2);
        assert_eq!(broker.metrics().backlog_messages.load(Ordering::Relaxed), 0);
        assert_eq!(broker.metrics().backlog_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(broker.metrics().published.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn concurrent_moves_are_all_kept() {
        // Nothing listens on port 1: the slot map stays empty but for the moves.
        let sink: BrokerSink = Arc::new(|_| crate::broker::Accepted::Delivered);
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.cluster = true;
        let broker = RedisBroker::start(config, sink).unwrap();
        let shared = &broker.shared;
        let before = shared.generation.load(Ordering::Acquire);
        std::thread::scope(|scope| {
            for t in 0..8u16 {
                scope.spawn(move || {
                    for n in 0..200u16 {
                        shared.moved(t * 200 + n, &format!("127.0.0.{}:7000", t + 1));
                    }
                });
            }
        });
        let topology = shared.topology();
        for t in 0..8u16 {
            for n in 0..200u16 {
                let want = format!("127.0.0.{}:7000", t + 1);
                assert_eq!(topology.owner(t * 200 + n), Some(want.as_str()));
            }
        }
        assert_eq!(topology.uncovered(), u32::from(cluster::SLOTS) - 1600);
        assert_eq!(shared.generation.load(Ordering::Acquire) - before, 1600);
        broker.shutdown();
    }

    #[test]
    fn a_retired_subscriber_link_leaves_a_new_one_to_the_same_node_alone() {
        // Nothing listens on port 1: no subscriber connection of its own.
        let sink: BrokerSink = Arc::new(|_| crate::broker::Accepted::Delivered);
        let mut config = RedisConfig::new("redis://127.0.0.1:1");
        config.cluster = true;
        let broker = RedisBroker::start(config, sink).unwrap();
        let shared = &broker.shared;
        let old = LinkState::at(Link::Subscriber, shared, "127.0.0.1:7000");
        shared.set_link(&old, true);
        // The node served slots again before the retired thread ended.
        let new = LinkState::at(Link::Subscriber, shared, "127.0.0.1:7000");
        shared.set_link(&new, true);
        shared.drop_subscriber_link(&old);
        assert_eq!(lock(&shared.subscriber_links).get(&new.id), Some(&true));
        assert_eq!(lock(&shared.subscriber_links).len(), 1);
        assert!(lock(&shared.links)[Link::Subscriber as usize]);
        broker.shutdown();
    }
}
