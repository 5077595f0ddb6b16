//! The Redis Pub/Sub broker (see the module docs of [`crate::broker`] for the contract).
//!
//! Each process holds exactly two Redis connections, each on its own OS thread, never on
//! an I/O core:
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

mod history;
mod publisher;
mod subscriber;

pub use history::StreamHistory;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::backlog::{Backlog, Outbound, QueueFailed, RateLimit};
use super::envelope;
use super::{Ack, Broker, BrokerMetrics, BrokerSink, HistoryReply, Kind, Refused};
use crate::config::Config;
use envelope::Origin;

/// How often the subscriber thread wakes up when no message arrives, to apply
/// subscription changes and to notice shutdown: the longest a new subscription waits
/// before it is sent to Redis.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Settings of the Redis broker. Build with [`RedisConfig::new`], then change fields.
#[derive(Debug, Clone, PartialEq)]
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
    redis::Client::open(url).map_err(|e| BrokerError::InvalidUrl(format!("{url:?}: {e}")))
}

/// Why the broker could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL is not a Redis URL this build can use.
    InvalidUrl(String),
    /// A setting is out of range (named).
    InvalidConfig(String),
    /// The OS could not give a random origin id or start a thread.
    Os(std::io::Error),
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl(e) => write!(f, "invalid Redis URL: {e}"),
            Self::InvalidConfig(e) => write!(f, "invalid Redis broker setting: {e}"),
            Self::Os(e) => write!(f, "cannot start the Redis broker: {e}"),
        }
    }
}

impl std::error::Error for BrokerError {}

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
        let client = client(&config.url)?;
        if config.publish_queue == 0 || config.publish_queue_bytes == 0 {
            return Err(BrokerError::InvalidConfig(
                "publish_queue and publish_queue_bytes must be above 0".into(),
            ));
        }
        for (name, value) in [
            ("backoff_min", config.backoff_min),
            ("backoff_max", config.backoff_max),
            ("io_timeout", config.io_timeout),
            ("health_interval", config.health_interval),
        ] {
            if value.is_zero() {
                return Err(BrokerError::InvalidConfig(format!(
                    "{name} must be above 0"
                )));
            }
        }
        let mut origin: Origin = [0; envelope::ORIGIN_LEN];
        getrandom::fill(&mut origin).map_err(|e| {
            BrokerError::Os(std::io::Error::other(format!("no random origin id: {e}")))
        })?;
        let addr = client.get_connection_info().addr().to_string();
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
            wanted: Mutex::new(HashSet::new()),
            wanted_changed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            links: Mutex::new([false, false, !with_history]),
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
                .map_err(BrokerError::Os)
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
        if lock(&self.shared.wanted).insert(topic.to_owned()) {
            self.shared.wanted_changed.store(true, Ordering::Release);
        }
    }

    fn unsubscribe(&self, topic: &str) {
        if lock(&self.shared.wanted).remove(topic) {
            self.shared.wanted_changed.store(true, Ordering::Release);
        }
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

/// What both threads share with the broker handle.
struct Shared {
    config: RedisConfig,
    client: redis::Client,
    /// `host:port` (or socket path) for log lines: the URL may hold a password.
    addr: String,
    origin: Origin,
    sink: BrokerSink,
    metrics: BrokerMetrics,
    /// Topics this process has local subscribers to. Changed by the I/O cores (short
    /// critical sections), applied to Redis by the subscriber thread.
    wanted: Mutex<HashSet<String>>,
    /// Set when `wanted` changed since the subscriber last applied it.
    wanted_changed: AtomicBool,
    stopping: AtomicBool,
    /// Whether each [`Link`] is connected; `connected` is 1 while both are.
    links: Mutex<[bool; 3]>,
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

    /// The Redis channel of `topic`, written into `out`.
    fn channel_into(&self, topic: &str, out: &mut String) {
        out.clear();
        out.push_str(&self.config.prefix);
        out.push_str(topic);
    }

    /// Connects, with backoff between failed attempts; `wait` sleeps for the given time
    /// and answers false when the broker is stopping. `None` when stopping. The caller
    /// reports the link as connected ([`LinkState::connected`]) once it is ready.
    fn connect(
        &self,
        link: &mut LinkState,
        mut wait: impl FnMut(Duration) -> bool,
    ) -> Option<redis::Connection> {
        loop {
            if self.stopping() {
                return None;
            }
            let attempt = self
                .client
                .get_connection_with_timeout(self.config.io_timeout)
                .and_then(|con| {
                    con.set_read_timeout(Some(self.config.io_timeout))?;
                    con.set_write_timeout(Some(self.config.io_timeout))?;
                    Ok(con)
                });
            match attempt {
                Ok(con) => return Some(con),
                Err(e) => {
                    link.attempt_failed(self, &e);
                    if !wait(link.backoff.next()) {
                        return None;
                    }
                }
            }
        }
    }

    fn set_link(&self, link: Link, up: bool) {
        let mut links = lock(&self.links);
        links[link as usize] = up;
        let both = links.iter().all(|&up| up);
        self.metrics
            .connected
            .store(u64::from(both), Ordering::Relaxed);
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
    backoff: Backoff,
    /// When the current outage began (`None` while connected or before the first
    /// connection), and whether it follows a loss (a reconnect) or the start.
    down_since: Option<(Instant, bool)>,
    up_since: Option<Instant>,
    failed_attempts: u64,
}

impl LinkState {
    fn new(link: Link, shared: &Shared) -> Self {
        let mut seed = [0; 32];
        seed[..envelope::ORIGIN_LEN].copy_from_slice(&shared.origin);
        seed[31] = link as u8;
        Self {
            link,
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
                addr = %shared.addr,
                "Redis broker: {} cannot connect: {error}; retrying in the background",
                self.link.name()
            );
        } else {
            tracing::debug!(
                addr = %shared.addr,
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
                    addr = %shared.addr,
                    "Redis broker: {} reconnected after {:.1} s ({} failed attempts)",
                    self.link.name(),
                    since.elapsed().as_secs_f64(),
                    self.failed_attempts
                );
            } else if self.failed_attempts > 0 {
                tracing::info!(addr = %shared.addr, "Redis broker: {} connected", self.link.name());
            }
        }
        self.failed_attempts = 0;
        self.up_since = Some(Instant::now());
        shared.set_link(self.link, true);
    }

    /// The connection was lost: one log line naming the cause.
    fn lost(&mut self, shared: &Shared, error: &redis::RedisError) {
        shared
            .metrics
            .connection_errors
            .fetch_add(1, Ordering::Relaxed);
        shared.set_link(self.link, false);
        tracing::warn!(
            addr = %shared.addr,
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
        shared.set_link(self.link, false);
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
            assert!(matches!(err, BrokerError::InvalidUrl(_)), "{url}: {err}");
        }
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
}
