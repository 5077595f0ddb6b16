//! The NATS broker (see the module docs of [`crate::broker`] for the contract): core
//! NATS subjects for live fan-out, JetStream for offsets, epochs, history and
//! recovery, with the same semantics as the Redis broker (docs/protocol.md).
//!
//! # Subjects and the stream
//!
//! A topic is one subject token, encoded reversibly ([`encode_topic`]: bytes outside
//! `[A-Za-z0-9_:-]` become `%XX`, so `.`, `*`, `>`, spaces and `%` itself never reach
//! a subject). Under the subject root [`NatsConfig::prefix`] (default `ringsocket`):
//!
//! - `<prefix>.h.<topic>`: what a process publishes, captured by **one JetStream
//!   stream per prefix** (named like the prefix, upper-cased, `RINGSOCKET`), file
//!   storage, `max_msgs_per_subject` = `history_size` (at least 1), `max_age` =
//!   `history_ttl_secs`, discard old.
//! - `<prefix>.l.<topic>`: the live side. The stream **republishes** every message it
//!   stored there (JetStream RePublish, NATS ≥ 2.9), so what reaches a live
//!   subscriber has been stored and numbered first, and nothing is published twice.
//!   Each process subscribes (core NATS) to the live subject of every topic it has
//!   local subscribers to.
//!
//! Every stored message is `rso <offset> <epoch> ` followed by the binary envelope
//! (`src/broker/envelope.rs`: origin, the process's sequence number, kind, payload),
//! the same bytes the Redis broker publishes.
//!
//! # Offsets: optimistic appends per subject
//!
//! A topic's offsets count its publications 1, 2, 3, ... with no gap, shared by every
//! process. JetStream numbers messages per *stream*, not per subject, so the offset is
//! assigned by the publisher and made unique by the server: each publish carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the topic's last
//! message as the publisher last saw it, and offset = that message's offset + 1.
//! JetStream stores it only if no other process appended to the subject in between
//! (otherwise "wrong last sequence": the publisher reads the subject's last message and
//! tries again). So two processes can never store the same offset, and the offsets of
//! a subject grow with its stream sequences, which makes a history read a binary
//! search by offset over stream sequences.
//!
//! Chosen over a per-topic counter in a KV bucket (a second write, and a counter that
//! can run ahead of what was stored when the publisher dies between the two) and over
//! the stream's own numbering (per stream, not per topic). The cost: one append per
//! topic is in flight at a time from each process (many topics at once), so one
//! topic's rate from one process is about one JetStream round trip per publication.
//!
//! The epoch is chosen at random by whoever appends offset 1 (or the first `subscribe`
//! of a topic with no message yet, which stores an offset-0 marker carrying it) and
//! copied into every later message. History is lost when the subject has no message
//! left (the stream was deleted or lost, or the topic was idle past
//! `history_ttl_secs`): the next publication starts over at offset 1 in a new epoch.
//!
//! # Exactly once, in order
//!
//! - Towards NATS: every publish carries `Nats-Msg-Id` = origin + sequence number; one
//!   whose answer was lost (connection broken, timeout) is sent again identically and
//!   JetStream answers "duplicate" for one it stored already (within the stream's
//!   duplicate window, 2 minutes), which is then taken as done
//!   (`ringsocket_broker_duplicates_total`).
//! - Towards subscribers: offsets. A process's sink drops an offset it has, and one
//!   above the next expected makes it fill the gap from the stream first (a live
//!   message from one process can overtake another's), so every process delivers each
//!   topic's publications once, in offset order.
//! - A process's own publications are handed to its sink when JetStream has numbered
//!   them (their `ringsocket.v1` side), not taken from the live subject.
//!
//! # NATS away
//!
//! Local delivery goes on; publishes wait in the backlog (`redis_backlog_messages` /
//! `redis_backlog_bytes`, shared with the Redis broker: `src/broker/backlog.rs`) and
//! are appended, in order per topic, once NATS is back. The client (`async-nats`)
//! reconnects with backoff and jitter and resubscribes; then the broker reads the last
//! message of every topic it listens to and fills what it missed meanwhile from the
//! stream, in order, so nothing published while this process was cut off is lost to
//! its subscribers (as far as the stream keeps it).
//!
//! Everything runs on one OS thread (`ringsocket-nats`) with its own current-thread
//! tokio runtime, never on an I/O core; the I/O cores only `try_send` into bounded
//! queues and touch a mutex-guarded set of wanted topics.

mod publisher;
mod reader;
mod subscriber;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};

pub use super::BrokerError;
use super::BrokerName;
use super::backlog::{Backlog, Outbound, QueueFailed};
use super::envelope::{self, Origin};
use super::{Ack, Broker, BrokerMetrics, BrokerSink, HistoryReply, Kind, Refused};
use crate::config::Config;

/// The broker named in this module's errors.
const NAME: BrokerName = BrokerName::Nats;

/// Settings of the NATS broker. Build with [`NatsConfig::new`], then change fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NatsConfig {
    /// `nats://[user:password@]host[:port]` or `tls://...`, comma-separated for several
    /// seed servers. No default.
    pub url: String,
    /// The subject root (one or more tokens: no `*`, `>` or spaces) and, upper-cased
    /// with other characters as `_`, the stream's name. Default `ringsocket`.
    pub prefix: String,
    /// The backlog's bound in messages (`redis_backlog_messages`). Default 65,536.
    pub publish_queue: usize,
    /// The backlog's bound in payload bytes (`redis_backlog_bytes`). Default 64 MiB.
    pub publish_queue_bytes: usize,
    /// Publications kept per topic in the stream (`history_size`); at least the last
    /// one is always kept, for numbering. Default 100.
    pub history_size: usize,
    /// How long a publication is kept (`history_ttl_secs`). Default 300 s.
    pub history_ttl: Duration,
    /// Largest payload taken from another process (`max_message_size`). Default 1 MiB.
    pub max_payload: usize,
    /// Longest wait for a JetStream answer before it is asked again. Default 2 s.
    pub io_timeout: Duration,
    /// First wait before reconnecting after a failed attempt, and before an append is
    /// retried. Default 100 ms.
    pub backoff_min: Duration,
    /// Longest such wait (each doubles up to it, with jitter). Default 5 s.
    pub backoff_max: Duration,
}

impl NatsConfig {
    /// The defaults, for the NATS server(s) at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "ringsocket".to_owned(),
            publish_queue: 65_536,
            publish_queue_bytes: 64 << 20,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            max_payload: 1 << 20,
            io_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }

    /// The broker settings of a server configuration (`nats_url`, the backlog,
    /// history and size limits).
    pub fn from_config(config: &Config) -> Self {
        let mut nats = Self::new(config.nats_url.clone());
        nats.publish_queue = config.redis_backlog_messages;
        nats.publish_queue_bytes = config.redis_backlog_bytes;
        nats.history_size = config.history_size;
        nats.history_ttl = Duration::from_secs(config.history_ttl_secs);
        nats.max_payload = config.max_message_size;
        nats
    }

    /// The stream's name: the prefix upper-cased, anything but letters, digits, `-`
    /// and `_` as `_`.
    pub fn stream_name(&self) -> String {
        self.prefix
            .chars()
            .map(|c| match c {
                'a'..='z' => c.to_ascii_uppercase(),
                'A'..='Z' | '0'..='9' | '-' | '_' => c,
                _ => '_',
            })
            .collect()
    }
}

/// Checks `url` (comma-separated servers) without connecting: each must be a
/// `nats://` or `tls://` URL with a host.
pub fn check_url(url: &str) -> Result<(), BrokerError> {
    servers(url).map(drop)
}

fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, BrokerError> {
    let mut out = Vec::new();
    for server in url.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let masked = crate::config::mask_url_password(server);
        let scheme_ok = ["nats://", "tls://"].iter().any(|s| server.starts_with(s));
        if !scheme_ok {
            return Err(BrokerError::InvalidUrl(
                NAME,
                format!("{masked:?}: expected nats://host[:port] or tls://host[:port]"),
            ));
        }
        let addr: async_nats::ServerAddr = server
            .parse()
            .map_err(|e| BrokerError::InvalidUrl(NAME, format!("{masked:?}: {e}")))?;
        if addr.host().is_empty() {
            return Err(BrokerError::InvalidUrl(
                NAME,
                format!("{masked:?}: no host"),
            ));
        }
        out.push(addr);
    }
    if out.is_empty() {
        return Err(BrokerError::InvalidUrl(NAME, "no server given".into()));
    }
    Ok(out)
}

/// Reads the broker thread may hold before `history` answers "busy".
const MAX_READS: usize = 16_384;

/// The NATS broker. See the module docs.
pub struct NatsBroker {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Outbound>,
    reads: mpsc::Sender<reader::Read>,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("addr", &self.shared.addr)
            .field("prefix", &self.shared.config.prefix)
            .field("backlog", &self.queued())
            .finish_non_exhaustive()
    }
}

impl NatsBroker {
    /// Starts the broker thread. Fails only for an invalid URL or setting (or if the
    /// OS refuses a thread): NATS being down is logged and retried in the background.
    pub fn start(config: NatsConfig, sink: BrokerSink) -> Result<Arc<Self>, BrokerError> {
        let servers = servers(&config.url)?;
        check_prefix(&config.prefix)?;
        super::error::check_nonzero(
            NAME,
            (config.publish_queue, config.publish_queue_bytes),
            &[
                ("history_ttl", config.history_ttl),
                ("io_timeout", config.io_timeout),
                ("backoff_min", config.backoff_min),
                ("backoff_max", config.backoff_max),
            ],
        )?;
        let origin = envelope::random_origin(NAME)?;
        let addr = servers
            .iter()
            .map(|s| format!("{}:{}", s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",");
        let (queue, queue_rx) = mpsc::channel(config.publish_queue);
        let (reads, reads_rx) = mpsc::channel(MAX_READS);
        let (stop, stop_rx) = watch::channel(false);
        let backlog = Backlog::new("NATS", config.publish_queue, config.publish_queue_bytes);
        let shared = Arc::new(Shared {
            stream: config.stream_name(),
            config,
            addr,
            origin,
            origin_hex: origin.iter().map(|b| format!("{b:02x}")).collect(),
            sink,
            metrics: BrokerMetrics::default(),
            backlog,
            wanted: Mutex::new(HashSet::new()),
            wanted_changed: Notify::new(),
            stopping: AtomicBool::new(false),
            was_connected: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ringsocket-nats".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!("NATS broker: cannot start its runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(run(thread_shared, servers, queue_rx, reads_rx, stop_rx));
            })
            .map_err(|e| BrokerError::Os(NAME, e))?;
        Ok(Arc::new(Self {
            shared,
            queue,
            reads,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Messages in the backlog: published here and not yet stored by JetStream.
    pub fn queued(&self) -> usize {
        usize::try_from(self.shared.metrics.backlog_messages.load(Ordering::Relaxed))
            .unwrap_or(usize::MAX)
    }

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
                    mpsc::error::TrySendError::Full(m) => QueueFailed::Full(m),
                    mpsc::error::TrySendError::Closed(m) => QueueFailed::Closed(m),
                })
            },
            || shared.metrics.connected.load(Ordering::Relaxed) == 1,
            &shared.addr,
        )
    }
}

impl Broker for NatsBroker {
    fn publish(&self, topic: &str, kind: Kind, payload: Bytes) -> Result<(), Refused> {
        self.enqueue(topic, kind, payload, None)
    }

    fn sequences(&self) -> bool {
        true
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
        let read = reader::Read {
            topic: topic.to_owned(),
            since,
            limit,
            reply,
        };
        if let Err(e) = self.reads.try_send(read) {
            let read = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            (read.reply)(Err("the NATS history reader is busy or stopped".into()));
        }
    }

    fn subscribe(&self, topic: &str) {
        if lock(&self.shared.wanted).insert(topic.to_owned()) {
            self.shared.wanted_changed.notify_one();
        }
    }

    fn unsubscribe(&self, topic: &str) {
        if lock(&self.shared.wanted).remove(topic) {
            self.shared.wanted_changed.notify_one();
        }
    }

    fn metrics(&self) -> &BrokerMetrics {
        &self.shared.metrics
    }

    fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let thread = lock(&self.thread).take();
        if let Some(thread) = thread {
            // The sink runs on the broker thread: it cannot join itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for NatsBroker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What the broker thread's tasks share with the broker handle.
struct Shared {
    config: NatsConfig,
    /// The JetStream stream's name.
    stream: String,
    /// `host:port` of each server, for log lines: the URL may hold a password.
    addr: String,
    origin: Origin,
    /// `origin` in hex, the first half of every `Nats-Msg-Id`.
    origin_hex: String,
    sink: BrokerSink,
    metrics: BrokerMetrics,
    backlog: Backlog,
    /// Topics this process has local subscribers to. Changed by the I/O cores (short
    /// critical sections), applied at NATS by the subscriber task.
    wanted: Mutex<HashSet<String>>,
    wanted_changed: Notify,
    stopping: AtomicBool,
    /// Set at the first connection: later failures follow a "connection lost" line.
    was_connected: AtomicBool,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The subject a topic is published on and stored under.
    fn stored_subject(&self, topic: &str) -> String {
        format!("{}.h.{}", self.config.prefix, encode_topic(topic))
    }

    /// The subject the stream republishes a topic's messages on.
    fn live_subject(&self, topic: &str) -> String {
        format!("{}.l.{}", self.config.prefix, encode_topic(topic))
    }

    /// The topic of a live subject, if it is one of ours.
    fn topic_of_live(&self, subject: &str) -> Option<String> {
        let token = subject
            .strip_prefix(self.config.prefix.as_str())?
            .strip_prefix(".l.")?;
        decode_topic(token)
    }
}

/// The broker thread: connects (in the background, retrying), then runs the
/// publisher, the subscriber and the history reads until the broker stops.
async fn run(
    shared: Arc<Shared>,
    servers: Vec<async_nats::ServerAddr>,
    queue: mpsc::Receiver<Outbound>,
    reads: mpsc::Receiver<reader::Read>,
    stop: watch::Receiver<bool>,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let errors_shared = shared.clone();
    let (min, max) = (shared.config.backoff_min, shared.config.backoff_max);
    let options = async_nats::ConnectOptions::new()
        .name("ringsocket")
        // Our own publications come back from JetStream's republish; they are taken
        // from the append's answer instead (see the module docs).
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(shared.config.io_timeout)
        .request_timeout(Some(shared.config.io_timeout))
        .ping_interval(Duration::from_secs(2))
        .reconnect_delay_callback(move |attempts| {
            // `attempts` counts the tries since the last success, this one included.
            if attempts > 1 {
                errors_shared
                    .metrics
                    .connection_errors
                    .fetch_add(1, Ordering::Relaxed);
                if attempts == 2 && !errors_shared.was_connected.load(Ordering::Relaxed) {
                    tracing::warn!(
                        addr = %errors_shared.addr,
                        "NATS broker: cannot connect; retrying in the background"
                    );
                }
            }
            reconnect_delay(attempts, min, max)
        })
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            async move {
                let _ = events_tx.send(event);
            }
        });
    let client = match options.connect(servers).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(addr = %shared.addr, "NATS broker: cannot start the client: {e}");
            return;
        }
    };
    let jetstream = async_nats::jetstream::ContextBuilder::new()
        .timeout(shared.config.io_timeout)
        .max_ack_inflight(publisher::MAX_IN_FLIGHT)
        .backpressure_on_inflight(true)
        .build(client.clone());
    // A handle by name: no request is made.
    let stream = match jetstream.get_stream_no_info(&shared.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::error!(stream = %shared.stream, "NATS broker: bad stream name: {e}");
            return;
        }
    };
    let store = reader::Store::new(shared.clone(), jetstream, stream);
    let (deliver_tx, deliver_rx) = mpsc::channel(subscriber::INBOX);
    let publisher = tokio::spawn(publisher::run(
        shared.clone(),
        store.clone(),
        queue,
        deliver_tx,
        stop.clone(),
    ));
    let reads_task = tokio::spawn(reader::serve(store.clone(), reads, stop.clone()));
    subscriber::run(&shared, &client, &store, events, deliver_rx, stop).await;
    let _ = publisher.await;
    let _ = reads_task.await;
    shared.metrics.connected.store(0, Ordering::Relaxed);
    shared.metrics.subscriptions.store(0, Ordering::Relaxed);
}

/// The wait before reconnection attempt `attempts` (1: the first after a loss, at
/// once): doubling from `min` up to `max`, half of it random ("equal jitter").
fn reconnect_delay(attempts: usize, min: Duration, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(20);
    let step = min.saturating_mul(1 << doublings).min(max.max(min));
    let half = step / 2;
    let half_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let jitter = getrandom::u64().unwrap_or(0) % half_nanos.saturating_add(1);
    half + Duration::from_nanos(jitter)
}

/// The subject root must be one or more non-empty tokens without wildcards or spaces.
fn check_prefix(prefix: &str) -> Result<(), BrokerError> {
    let valid = !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        });
    if valid {
        Ok(())
    } else {
        Err(BrokerError::InvalidConfig(
            NAME,
            format!(
                "prefix {prefix:?} is not a NATS subject (tokens of printable characters \
             without '*' or '>', separated by '.')"
            ),
        ))
    }
}

/// A topic as one NATS subject token: ASCII letters, digits, `-`, `_` and `:` as they
/// are, every other byte as `%XX` (upper-case hex). Reversible ([`decode_topic`]), and
/// never empty for a non-empty topic.
pub fn encode_topic(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for &b in topic.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The topic a token of [`encode_topic`] stands for; `None` for anything else.
pub fn decode_topic(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h))
            {
                return None;
            }
            let byte = u8::from_str_radix(hex, 16).ok()?;
            // Only what the encoder escapes: one spelling per topic.
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b':') {
                return None;
            }
            out.push(byte);
            i += 3;
        } else if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':') {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// Locks a mutex whose data stays valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits `d`; false when the broker stops first.
async fn sleep_unless_stopped(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn topics_become_one_subject_token_and_back() {
        for (topic, token) in [
            ("room", "room"),
            ("chat:lobby", "chat:lobby"),
            ("a.b", "a%2Eb"),
            ("*", "%2A"),
            (">", "%3E"),
            ("two words", "two%20words"),
            ("100%", "100%25"),
            ("é", "%C3%A9"),
        ] {
            assert_eq!(encode_topic(topic), token);
            assert_eq!(decode_topic(token).as_deref(), Some(topic));
        }
        for bad in ["a.b", "a b", "%2", "%zz", "%41", "%2e", "*", ">"] {
            assert_eq!(decode_topic(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn any_topic_round_trips_as_a_valid_token(topic in "\\PC{1,40}") {
            let token = encode_topic(&topic);
            prop_assert!(!token.is_empty());
            prop_assert!(token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>')));
            prop_assert_eq!(decode_topic(&token), Some(topic));
        }
    }

    #[test]
    fn urls_prefixes_and_settings_are_checked() {
        assert!(check_url("nats://127.0.0.1:4222").is_ok());
        assert!(check_url("nats://a:4222, nats://b:4222").is_ok());
        assert!(check_url("tls://user:pw@nats.example.com").is_ok());
        for bad in [
            "",
            "redis://x",
            "127.0.0.1:4222",
            "nats://",
            "nats://a,http://b",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let err = check_url("http://user:secret@x").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
        assert!(check_prefix("ringsocket").is_ok());
        assert!(check_prefix("app.rs").is_ok());
        for bad in ["", "a..b", "a.*", "a b", ">"] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
        assert_eq!(NatsConfig::new("nats://x").stream_name(), "RINGSOCKET");
        let mut config = NatsConfig::new("nats://x");
        config.prefix = "app.rs-1".into();
        assert_eq!(config.stream_name(), "APP_RS-1");
        let sink: BrokerSink = Arc::new(|_| crate::broker::Accepted::Delivered);
        let mut config = NatsConfig::new("nats://127.0.0.1:1");
        config.publish_queue = 0;
        let err = NatsBroker::start(config, sink).unwrap_err();
        assert!(err.to_string().contains("publish_queue"), "{err}");
    }

    #[test]
    fn settings_come_from_the_server_config() {
        let config = Config {
            nats_url: "nats://10.0.0.1:4222".into(),
            redis_backlog_messages: 10,
            redis_backlog_bytes: 1000,
            history_size: 7,
            history_ttl_secs: 60,
            max_message_size: 4096,
            ..Config::default()
        };
        let nats = NatsConfig::from_config(&config);
        assert_eq!(nats.url, "nats://10.0.0.1:4222");
        assert_eq!((nats.publish_queue, nats.publish_queue_bytes), (10, 1000));
        assert_eq!(
            (nats.history_size, nats.history_ttl),
            (7, Duration::from_secs(60))
        );
        assert_eq!(nats.max_payload, 4096);
    }

    #[test]
    fn reconnect_delays_double_with_jitter_up_to_the_max() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(reconnect_delay(1, min, max), Duration::ZERO);
        let mut step = min;
        for attempts in 2..20 {
            let d = reconnect_delay(attempts, min, max);
            assert!(d >= step / 2 && d <= step, "{attempts}: {d:?} for {step:?}");
            step = (step * 2).min(max);
        }
    }

    #[test]
    fn a_broker_with_no_server_holds_publishes_up_to_its_bound() {
        let sink: BrokerSink = Arc::new(|_| crate::broker::Accepted::Delivered);
        let mut config = NatsConfig::new("nats://127.0.0.1:1");
        config.publish_queue = 1;
        let broker = NatsBroker::start(config, sink).unwrap();
        assert!(broker.sequences());
        assert_eq!(
            broker.publish("t", Kind::Text, Bytes::from_static(b"a")),
            Ok(())
        );
        assert_eq!(
            broker.publish("t", Kind::Text, Bytes::from_static(b"b")),
            Err(Refused::BacklogFull)
        );
        let (tx, rx) = std::sync::mpsc::channel();
        broker
            .publish_acked(
                "t",
                Kind::Text,
                Bytes::from_static(b"c"),
                Box::new(move |position| {
                    let _ = tx.send(position);
                }),
            )
            .unwrap_err();
        assert_eq!(
            rx.recv().unwrap(),
            None,
            "a refused publish is acked with None"
        );
        broker.shutdown();
        let metrics = broker.metrics();
        assert_eq!(metrics.backlog_messages.load(Ordering::Relaxed), 0);
        assert_eq!(metrics.backlog_full.load(Ordering::Relaxed), 2);
        // Two refused, one abandoned at shutdown.
        assert_eq!(metrics.publish_failed.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.connected.load(Ordering::Relaxed), 0);
        assert_eq!(
            broker.publish("t", Kind::Text, Bytes::from_static(b"d")),
            Err(Refused::Stopped)
        );
    }
}
