//! Server configuration: every field with its default and unit, defaults in one place.
//!
//! Precedence, lowest first: these defaults, the TOML file (`ringsocket.toml`), the
//! environment (`RINGSOCKET_<FIELD>`, e.g. `RINGSOCKET_BIND=0.0.0.0:9000`), then flags.
//!
//! Every source goes through one parser per field, [`Config::set`]: a value reads the
//! same in the file, in the environment and after `--set` (a TOML string, number or
//! list in the file is handed to it as its text). [`Config::validate`] refuses values
//! outside their range, naming the range; [`Config::warnings`] lists the values that
//! are accepted but probably not what was meant. [`Loader`] keeps track of where each
//! value came from, for `ringsocket config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// What a connection that queues too many outbound bytes (a slow consumer) gets.
///
/// Written `close-1013` or `close-1008` (also accepted: `close1013`, `1013`, and the
/// same for 1008), in the file, the environment and `--set` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Close with 1013 "try again later" (the default).
    Close1013,
    /// Close with 1008 "policy violation".
    Close1008,
}

impl SlowConsumerPolicy {
    /// The canonical spelling, as `ringsocket config` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Close1013 => "close-1013",
            Self::Close1008 => "close-1008",
        }
    }
}

impl FromStr for SlowConsumerPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match spelling(s).as_str() {
            "close1013" | "1013" => Ok(Self::Close1013),
            "close1008" | "1008" => Ok(Self::Close1008),
            _ => Err(format!("expected close-1013 or close-1008, got {s:?}")),
        }
    }
}

impl fmt::Display for SlowConsumerPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection that sends more than `max_messages_per_sec` (beyond its burst)
/// gets. Written `close` or `drop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RateLimitPolicy {
    /// Close with 1008 "rate limit" (the default).
    Close,
    /// Drop the message, count it, and keep the connection.
    Drop,
}

impl RateLimitPolicy {
    /// The canonical spelling, as `ringsocket config` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Close => "close",
            Self::Drop => "drop",
        }
    }
}

impl FromStr for RateLimitPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match spelling(s).as_str() {
            "close" | "close1008" | "1008" => Ok(Self::Close),
            "drop" => Ok(Self::Drop),
            _ => Err(format!("expected close or drop, got {s:?}")),
        }
    }
}

impl fmt::Display for RateLimitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `compression`: whether permessage-deflate (RFC 7692) is negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Never: the 101 carries no extension.
    Off,
    /// When the client offers it (the default; every browser does).
    On,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match spelling(s).as_str() {
            "on" | "true" | "yes" | "1" | "deflate" | "permessagedeflate" => Ok(Self::On),
            "off" | "false" | "no" | "0" => Ok(Self::Off),
            _ => Err(format!("expected on or off, got {s:?}")),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::On => "on",
        })
    }
}

/// `s` as a setting's keyword is compared: trimmed, lower case, without `-` and `_`.
fn spelling(s: &str) -> String {
    s.trim()
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Which I/O backend the workers run on.
///
/// Written `auto`, `io_uring` (also `io-uring`, `iouring`, `uring`) or `epoll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoBackend {
    /// io_uring when this process can set up a ring, epoll otherwise (with one WARN
    /// naming the cause and how to allow io_uring). The default.
    Auto,
    /// io_uring, or a clear error and exit 1 when it is not available.
    IoUring,
    /// epoll, through tokio's reactor: for hosts and containers that deny io_uring.
    Epoll,
}

impl IoBackend {
    /// The canonical spelling, as `ringsocket config` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl FromStr for IoBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match spelling(s).as_str() {
            "auto" => Ok(Self::Auto),
            "iouring" | "uring" => Ok(Self::IoUring),
            "epoll" => Ok(Self::Epoll),
            _ => Err(format!("expected auto, io_uring or epoll, got {s:?}")),
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which broker carries publishes between processes (`broker`).
///
/// Written `local`, `redis` or `nats`; unset, `redis` when `redis_url` is set, else
/// `local` ([`Config::broker_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerKind {
    /// No broker: this process alone (the embedded in-process fan-out).
    Local,
    /// Redis Pub/Sub, with offsets and history at Redis (`redis_url`).
    Redis,
    /// Core NATS for live fan-out, JetStream for offsets and history (`nats_url`).
    Nats,
}

impl BrokerKind {
    /// The canonical spelling, as `ringsocket config` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Redis => "redis",
            Self::Nats => "nats",
        }
    }
}

impl FromStr for BrokerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match spelling(s).as_str() {
            "local" => Ok(Self::Local),
            "redis" => Ok(Self::Redis),
            "nats" => Ok(Self::Nats),
            _ => Err(format!("expected local, redis or nats, got {s:?}")),
        }
    }
}

/// The server's settings. Durations are in seconds in the file and the environment.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Config {
    /// Address to listen on. Default `127.0.0.1:9001`.
    pub bind: SocketAddr,
    /// Worker threads, one per core, each pinned. Default 0: one per available core.
    pub workers: usize,
    /// The I/O backend: `auto` (default: io_uring when it can be set up, else epoll),
    /// `io_uring` or `epoll`.
    pub io_backend: IoBackend,
    /// Open connections allowed in the process (WebSocket and HTTP). Beyond it new
    /// requests get 503 before any upgrade. Default 100,000.
    pub max_connections: usize,
    /// Time a client has to send a complete request head, and that an HTTP keep-alive
    /// connection may stay idle between requests, in seconds. Default 10.
    pub handshake_timeout_secs: f64,
    /// How long the kernel may hold a new connection whose client has sent nothing yet
    /// before handing it to a worker (`TCP_DEFER_ACCEPT`), in whole seconds. Deferred
    /// accepts arrive with their request head, which saves the core a turn per
    /// handshake; a silent client is handed over after this and then gets the
    /// handshake timeout. Default 1; 0: accept at once.
    pub defer_accept_secs: u32,
    /// A connection silent this long is pinged, in seconds. Default 25 (load balancers
    /// commonly drop idle TCP after 60 s).
    pub ping_interval_secs: f64,
    /// A pinged connection that sends nothing for this long is closed, in seconds.
    /// Default 20.
    pub pong_timeout_secs: f64,
    /// Close a WebSocket that has received no data message for this long, in seconds.
    /// Default 0: no idle timeout (heartbeats still run).
    pub idle_timeout_secs: f64,
    /// Largest incoming WebSocket message, in bytes. Default 1 MiB (close 1009 beyond).
    pub max_message_size: usize,
    /// Largest incoming WebSocket frame, in bytes. Default 1 MiB (close 1009 beyond).
    pub max_frame_size: usize,
    /// Outbound bytes a connection may have queued before it is a slow consumer.
    /// Default 4 MiB.
    pub max_outbound_bytes: usize,
    /// What a slow consumer gets. Default `close-1013`.
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Largest HTTP request body (`Content-Length`), in bytes. Default 1 MiB (413 beyond).
    pub max_body_bytes: usize,
    /// Largest HTTP request head, in bytes. Default 8 KiB (431 beyond).
    pub max_head_bytes: usize,
    /// Time allowed after SIGINT/SIGTERM for peers to answer Close 1001, in seconds.
    /// Default 5.
    pub shutdown_timeout_secs: f64,
    /// Conflated topics of the default app: exact names or prefixes ending in `*`
    /// (comma-separated in the environment and `--set`). Within the window only the
    /// latest message per key reaches each subscriber (see `ringsocket::pubsub`).
    /// Default `cursors:*` (the demo page's live cursors); set it empty (`""`) for none.
    pub conflate_topics: Vec<String>,
    /// The conflation window, in milliseconds. Default 16 (about 60 Hz).
    pub conflate_window_ms: u64,
    /// Redis server that carries published messages between processes, as
    /// `redis://[user:password@]host[:port][/db]`. Default empty: no Redis, only the
    /// embedded in-process broker.
    pub redis_url: String,
    /// Redis Cluster: `redis_url` lists one or more seed nodes, comma-separated, and
    /// topics are sharded over the masters with sharded Pub/Sub (Redis 7 or later).
    /// Default false.
    pub redis_cluster: bool,
    /// Prefix of the Redis channel of every topic. Default `ringsocket:`.
    pub redis_prefix: String,
    /// The Redis broker's backlog, in messages: publishes not yet acknowledged by
    /// Redis, held while it is away and sent in order when it is back. A publish
    /// beyond it is refused before anyone gets it (`POST /publish`: 503) and counted in
    /// `ringsocket_broker_backlog_full_total`. Default 65,536.
    pub redis_backlog_messages: usize,
    /// The Redis broker's backlog, in payload bytes; beyond it the same as
    /// `redis_backlog_messages`. Default 64 MiB.
    pub redis_backlog_bytes: usize,
    /// Which broker carries publishes between processes: `local`, `redis` or `nats`.
    /// Default (`None`): `redis` when `redis_url` is set, else `local`
    /// ([`Config::broker_kind`]). The backlog bounds `redis_backlog_*` apply to
    /// whichever broker runs.
    pub broker: Option<BrokerKind>,
    /// NATS server(s) for `broker = nats`, `nats://[user:password@]host[:port]`
    /// (comma-separated for a cluster's seeds; `tls://` for TLS). JetStream must be
    /// enabled (`nats-server -js`). Default empty.
    pub nats_url: String,
    /// Background executor threads (never the I/O cores). Default 1.
    pub task_threads: usize,
    /// Background jobs the queue holds, queued or reserved by requests whose response
    /// is being written. Beyond it a job is refused (the app's queue-full policy: 503
    /// or drop, counted in `ringsocket_tasks_rejected_total`). Default 10,000.
    pub task_queue_capacity: usize,
    /// Nice value of the executor threads (absolute), -20 (most favoured) to 19. When
    /// an executor thread and an I/O core share a CPU and both are busy, the scheduler
    /// shares it by these weights; raise it to favour the I/O cores. Default 0.
    pub task_nice: i32,
    /// Redis of the durable job queue (`App::job`, `tasks().enqueue`), as `redis_url`.
    /// Default empty: `redis_url`. See `ringsocket::tasks::jobs`.
    pub jobs_redis_url: String,
    /// Prefix of the job streams' keys: `{prefix}{job}` (the job's stream), `:retry`,
    /// `:dead` after it. Default `ringsocket:jobs:`.
    pub jobs_stream_prefix: String,
    /// Runs of a job before it goes to its dead-letter stream. Default 5.
    pub job_max_attempts: u32,
    /// Wait before the first retry, in ms; it doubles per attempt (at most 1 h). Default 1,000.
    pub job_retry_backoff_ms: u64,
    /// A job delivered to a process that stopped renewing it (it died) for this long is
    /// run by another. Default 30.
    pub job_visibility_timeout_secs: u64,
    /// Durable jobs this process runs at once; 0: it only enqueues. Default 16.
    pub job_concurrency: usize,
    /// Entries a job's dead-letter stream keeps (approximately; the oldest go). Default 10,000.
    pub job_dead_letter_maxlen: usize,
    /// TLS certificate chain, PEM (the certificate first). With `tls_key` set too,
    /// every listener on `bind` speaks TLS 1.2 and 1.3 (`wss://`, `https://`). Read at
    /// start and again on SIGHUP. Default empty: no TLS.
    pub tls_cert: String,
    /// TLS private key, PEM: PKCS#8, RSA (PKCS#1) or EC (SEC1). Default empty.
    pub tls_key: String,
    /// A second, plain (no TLS) listener beside the TLS one, e.g. for health checks
    /// inside a cluster: `IP:PORT`. Default empty: none. Needs `tls_cert`.
    pub plain_bind: String,
    /// Origins a WebSocket handshake may come from (the `Origin` header): exact origins
    /// (`https://app.example.com`) or patterns of subdomains (`https://*.example.com`,
    /// `*.example.com` for any scheme). Any other origin gets 403 before the upgrade.
    /// A handshake without `Origin` (not a browser) is allowed. Default empty: any
    /// origin (with a WARN at start when `bind` is not loopback).
    pub allowed_origins: Vec<String>,
    /// Bearer tokens that may call `POST /publish/{topic}` (comma-separated in the
    /// environment and `--set`). Default none: the publish API is open only when the
    /// server is bound to loopback, and answers 403 otherwise.
    pub publish_token: Vec<String>,
    /// A file with more publish tokens, one per line (`#` starts a comment). Read at
    /// start. Default empty.
    pub publish_token_file: String,
    /// The HS256 secret that signs subscribers' JWTs. Setting it (or
    /// `jwt_public_key`) makes every WebSocket handshake need a valid token. Default
    /// empty.
    pub jwt_secret: String,
    /// The RS256 or ES256 public key (a PEM file's path, or the PEM itself) that
    /// verifies subscribers' JWTs. Default empty.
    pub jwt_public_key: String,
    /// The cookie a subscriber's JWT may come in (besides `?token=` and
    /// `Authorization: Bearer`). Default empty: no cookie.
    pub jwt_cookie: String,
    /// The team's HTTP endpoint that admits WebSocket handshakes (`http://` or
    /// `https://`): it gets the upgrade request's headers; 200 with
    /// `{"sub":…,"topics":[…],"publish":[…]}` admits, any other status rejects with
    /// that status. Default empty: none.
    pub auth_url: String,
    /// How long `auth_url` may take to answer, in seconds; then the handshake gets
    /// 503. Default 2.
    pub auth_timeout_secs: f64,
    /// Open connections allowed from one client address. Beyond it the handshake gets
    /// 429. Default 1,000; 0: no limit. Addresses in `ip_limits_exempt` are not
    /// counted.
    pub max_connections_per_ip: usize,
    /// New requests (handshakes and HTTP requests on new connections) allowed per
    /// second from one client address, with a burst of the same size. Beyond it: 429.
    /// Default 100; 0: no limit.
    pub max_handshakes_per_ip_per_sec: u32,
    /// Client addresses (CIDRs) the per-IP limits do not apply to. Default
    /// `127.0.0.0/8, ::1/128`: local tools, load generators and sidecars.
    pub ip_limits_exempt: Vec<String>,
    /// Data messages one connection may send per second (a token bucket of
    /// `max_messages_burst`). Default 0: no limit.
    pub max_messages_per_sec: u32,
    /// The burst of `max_messages_per_sec`: messages a quiet connection may send at
    /// once. Default 0: twice the rate.
    pub max_messages_burst: u32,
    /// What a connection over `max_messages_per_sec` gets: `close` (1008 "rate
    /// limit", the default) or `drop` (the message is dropped and counted).
    pub rate_limit_policy: RateLimitPolicy,
    /// Ping, pong and close frames one connection may send per second (and at once).
    /// Beyond it: close 1008 "too many control frames". Default 50; 0: no limit.
    pub max_control_frames_per_sec: u32,
    /// Topics one connection may be subscribed to at once. Default 1,024 (also the
    /// most).
    pub max_topics_per_connection: usize,
    /// Longest topic name, in bytes. Default 255 (at most 256).
    pub max_topic_length: usize,
    /// Proxies (CIDRs) whose `X-Forwarded-For` or `Forwarded` header names the real
    /// client. Default none: the peer address is the client.
    pub trusted_proxies: Vec<String>,
    /// Every connection on `bind` (not `plain_bind`) starts with a PROXY protocol
    /// header (v1 or v2, HAProxy, AWS NLB) naming the real client, before TLS; a
    /// connection without one is closed. Default false.
    pub proxy_protocol: bool,
    /// Bearer token `GET /metrics` needs. Default empty: `/metrics` is open (with a
    /// WARN at start when `bind` is not loopback and `metrics_bind` is not set).
    pub metrics_token: String,
    /// A separate plain listener that serves `/metrics` and `/healthz` only (e.g.
    /// `127.0.0.1:9090`); the main listener then answers `/metrics` with 404. Default
    /// empty: none.
    pub metrics_bind: String,
    /// Topics shown with their own label in `/metrics` (the ones with the most
    /// subscribers); the rest are summed under `topic="_other"`. Default 20.
    pub metrics_topics: usize,
    /// Bytes of partly received messages all connections together may hold. Beyond it
    /// a connection whose partial message grows past 64 KiB is closed with 1013.
    /// Default 256 MiB.
    pub max_inbound_memory: usize,
    /// permessage-deflate (RFC 7692): `on` (the default: negotiated when the client
    /// offers it) or `off`.
    pub compression: Compression,
    /// Messages shorter than this, in bytes, go out uncompressed, and so do those that
    /// compression does not make smaller. Default 256. 0: every message is
    /// compressed, whatever it gives (what conformance suites expect).
    pub compression_min_bytes: usize,
    /// zlib's compression level, 0 (store) to 9 (smallest). Default 1 (fastest; see
    /// benches/README.md for what the others cost and save).
    pub compression_level: u32,
    /// Bytes all connections together may hold as their clients' compression windows
    /// (a client that keeps its context between messages makes the server keep its
    /// last 32 KiB). Beyond it, new connections negotiate `client_no_context_takeover`
    /// and hold no window. Default 64 MiB.
    pub compression_memory_limit: usize,
    /// `ringsocket.v1` recovery: publications kept per topic. Default 100. 0: none
    /// (offsets and epochs still count; a client that missed any gets
    /// `recovered: false`).
    pub history_size: usize,
    /// How long a kept publication is kept, in seconds. Default 300. A topic with no
    /// publication for this long is forgotten (its next one starts a new epoch).
    pub history_ttl_secs: u64,
    /// Bytes of kept publications over every topic. Beyond it the topics published
    /// longest ago lose theirs. Default 64 MiB.
    pub history_memory_limit: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 9001)),
            workers: 0,
            max_connections: 100_000,
            handshake_timeout_secs: 10.0,
            defer_accept_secs: 1,
            ping_interval_secs: 25.0,
            pong_timeout_secs: 20.0,
            idle_timeout_secs: 0.0,
            max_message_size: 1 << 20,
            max_frame_size: 1 << 20,
            max_outbound_bytes: 4 << 20,
            slow_consumer_policy: SlowConsumerPolicy::Close1013,
            io_backend: IoBackend::Auto,
            max_body_bytes: 1 << 20,
            max_head_bytes: 8 << 10,
            shutdown_timeout_secs: 5.0,
            conflate_topics: vec!["cursors:*".to_owned()],
            conflate_window_ms: 16,
            redis_url: String::new(),
            redis_cluster: false,
            redis_prefix: "ringsocket:".to_owned(),
            redis_backlog_messages: 65_536,
            redis_backlog_bytes: 64 << 20,
            broker: None,
            nats_url: String::new(),
            task_threads: 1,
            task_queue_capacity: 10_000,
            task_nice: 0,
            jobs_redis_url: String::new(),
            jobs_stream_prefix: "ringsocket:jobs:".to_owned(),
            job_max_attempts: 5,
            job_retry_backoff_ms: 1_000,
            job_visibility_timeout_secs: 30,
            job_concurrency: 16,
            job_dead_letter_maxlen: 10_000,
            tls_cert: String::new(),
            tls_key: String::new(),
            plain_bind: String::new(),
            allowed_origins: Vec::new(),
            publish_token: Vec::new(),
            publish_token_file: String::new(),
            jwt_secret: String::new(),
            jwt_public_key: String::new(),
            jwt_cookie: String::new(),
            auth_url: String::new(),
            auth_timeout_secs: 2.0,
            max_connections_per_ip: 1_000,
            max_handshakes_per_ip_per_sec: 100,
            ip_limits_exempt: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
            max_messages_per_sec: 0,
            max_messages_burst: 0,
            rate_limit_policy: RateLimitPolicy::Close,
            max_control_frames_per_sec: 50,
            max_topics_per_connection: 1_024,
            max_topic_length: 255,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            metrics_token: String::new(),
            metrics_bind: String::new(),
            metrics_topics: 20,
            max_inbound_memory: 256 << 20,
            compression: Compression::On,
            compression_min_bytes: 256,
            compression_level: 1,
            compression_memory_limit: 64 << 20,
            history_size: 100,
            history_ttl_secs: 300,
            history_memory_limit: 64 << 20,
        }
    }
}

/// A configuration that could not be loaded, naming the source and the field.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Every setting's name, in the order `ringsocket config` prints them.
pub const FIELDS: [&str; 68] = [
    "bind",
    "workers",
    "io_backend",
    "max_connections",
    "handshake_timeout_secs",
    "defer_accept_secs",
    "ping_interval_secs",
    "pong_timeout_secs",
    "idle_timeout_secs",
    "max_message_size",
    "max_frame_size",
    "max_outbound_bytes",
    "slow_consumer_policy",
    "max_body_bytes",
    "max_head_bytes",
    "shutdown_timeout_secs",
    "conflate_topics",
    "conflate_window_ms",
    "redis_url",
    "redis_cluster",
    "redis_prefix",
    "redis_backlog_messages",
    "redis_backlog_bytes",
    "broker",
    "nats_url",
    "task_threads",
    "task_queue_capacity",
    "task_nice",
    "jobs_redis_url",
    "jobs_stream_prefix",
    "job_max_attempts",
    "job_retry_backoff_ms",
    "job_visibility_timeout_secs",
    "job_concurrency",
    "job_dead_letter_maxlen",
    "tls_cert",
    "tls_key",
    "plain_bind",
    "allowed_origins",
    "publish_token",
    "publish_token_file",
    "jwt_secret",
    "jwt_public_key",
    "jwt_cookie",
    "auth_url",
    "auth_timeout_secs",
    "max_connections_per_ip",
    "max_handshakes_per_ip_per_sec",
    "ip_limits_exempt",
    "max_messages_per_sec",
    "max_messages_burst",
    "rate_limit_policy",
    "max_control_frames_per_sec",
    "max_topics_per_connection",
    "max_topic_length",
    "trusted_proxies",
    "proxy_protocol",
    "metrics_token",
    "metrics_bind",
    "metrics_topics",
    "max_inbound_memory",
    "compression",
    "compression_min_bytes",
    "compression_level",
    "compression_memory_limit",
    "history_size",
    "history_ttl_secs",
    "history_memory_limit",
];

/// The largest `history_size` accepted.
pub const MAX_HISTORY_SIZE: usize = 1_000_000;

/// The largest `workers` accepted.
pub const MAX_WORKERS: usize = 1024;
/// The range of `max_head_bytes`: room for a real handshake, up to the 16-bit offsets
/// a parsed request stores its parts in.
pub const MAX_HEAD_BYTES_RANGE: (usize, usize) = (512, u16::MAX as usize);
/// The largest `max_topics_per_connection` accepted (the pubsub registry's own bound).
pub const MAX_TOPICS_PER_CONNECTION: usize = 1024;
/// The largest `max_topic_length` accepted (the pubsub layer's own bound).
pub const MAX_TOPIC_LENGTH: usize = 256;
/// The largest `max_message_size` and `max_frame_size` accepted: 1 GiB.
pub const MAX_MESSAGE_SIZE: usize = 1 << 30;

impl Config {
    /// Reads a TOML file over the defaults. Unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut loader = Loader::new();
        loader.file(path)?;
        Ok(loader.config)
    }

    /// Reads TOML text over the defaults, each key through [`Config::set`]. Unknown
    /// keys are an error.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut loader = Loader::new();
        loader.toml(text, None)?;
        Ok(loader.config)
    }

    /// Applies `RINGSOCKET_<FIELD>` variables from `vars` over this configuration.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let mut loader = Loader {
            config: std::mem::take(self),
            sources: Sources::default(),
        };
        let result = loader.env(vars);
        *self = loader.config;
        result
    }

    /// Sets one field from its text form, by its name in the file: the one parser
    /// every source goes through. Lists (`conflate_topics`) are written `a,b*` or
    /// `["a", "b*"]`; `slow_consumer_policy` as [`SlowConsumerPolicy`] says. Returns
    /// the field's canonical name.
    pub fn set(&mut self, field: &str, value: &str) -> Result<&'static str, String> {
        let name = FIELDS
            .iter()
            .copied()
            .find(|name| *name == field)
            .ok_or_else(|| format!("unknown setting {field:?} (known: {})", FIELDS.join(", ")))?;
        match name {
            "bind" => {
                self.bind = value.trim().parse().map_err(|_| {
                    format!("not an address: {value:?} (expected IP:PORT, e.g. 0.0.0.0:9001)")
                })?
            }
            "workers" => self.workers = whole(value)?,
            "io_backend" => self.io_backend = value.parse()?,
            "max_connections" => self.max_connections = whole(value)?,
            "handshake_timeout_secs" => self.handshake_timeout_secs = seconds(value)?,
            "defer_accept_secs" => self.defer_accept_secs = whole(value)?,
            "ping_interval_secs" => self.ping_interval_secs = seconds(value)?,
            "pong_timeout_secs" => self.pong_timeout_secs = seconds(value)?,
            "idle_timeout_secs" => self.idle_timeout_secs = seconds(value)?,
            "max_message_size" => self.max_message_size = whole(value)?,
            "max_frame_size" => self.max_frame_size = whole(value)?,
            "max_outbound_bytes" => self.max_outbound_bytes = whole(value)?,
            "slow_consumer_policy" => self.slow_consumer_policy = value.parse()?,
            "max_body_bytes" => self.max_body_bytes = whole(value)?,
            "max_head_bytes" => self.max_head_bytes = whole(value)?,
            "shutdown_timeout_secs" => self.shutdown_timeout_secs = seconds(value)?,
            "conflate_topics" => self.conflate_topics = topic_list(value)?,
            "conflate_window_ms" => self.conflate_window_ms = whole(value)?,
            "redis_url" => self.redis_url = value.trim().to_owned(),
            "redis_cluster" => self.redis_cluster = boolean(value)?,
            "redis_prefix" => self.redis_prefix = value.to_owned(),
            "redis_backlog_messages" => self.redis_backlog_messages = whole(value)?,
            "redis_backlog_bytes" => self.redis_backlog_bytes = whole(value)?,
            "broker" => self.broker = Some(value.parse()?),
            "nats_url" => self.nats_url = value.trim().to_owned(),
            "task_threads" => self.task_threads = whole(value)?,
            "task_queue_capacity" => self.task_queue_capacity = whole(value)?,
            "task_nice" => self.task_nice = whole(value)?,
            "jobs_redis_url" => self.jobs_redis_url = value.trim().to_owned(),
            "jobs_stream_prefix" => self.jobs_stream_prefix = value.to_owned(),
            "job_max_attempts" => self.job_max_attempts = whole(value)?,
            "job_retry_backoff_ms" => self.job_retry_backoff_ms = whole(value)?,
            "job_visibility_timeout_secs" => self.job_visibility_timeout_secs = whole(value)?,
            "job_concurrency" => self.job_concurrency = whole(value)?,
            "job_dead_letter_maxlen" => self.job_dead_letter_maxlen = whole(value)?,
            "tls_cert" => self.tls_cert = value.trim().to_owned(),
            "tls_key" => self.tls_key = value.trim().to_owned(),
            "plain_bind" => {
                let value = value.trim();
                if !value.is_empty() {
                    value.parse::<SocketAddr>().map_err(|_| {
                        format!("not an address: {value:?} (expected IP:PORT, e.g. 10.0.0.5:9002)")
                    })?;
                }
                self.plain_bind = value.to_owned();
            }
            "allowed_origins" => {
                let origins = string_list(value)?;
                for origin in &origins {
                    check_origin_pattern(origin)?;
                }
                self.allowed_origins = origins;
            }
            "publish_token" => self.publish_token = string_list(value)?,
            "publish_token_file" => self.publish_token_file = value.trim().to_owned(),
            "jwt_secret" => self.jwt_secret = value.to_owned(),
            "jwt_public_key" => self.jwt_public_key = value.trim().to_owned(),
            "jwt_cookie" => self.jwt_cookie = value.trim().to_owned(),
            "auth_url" => self.auth_url = value.trim().to_owned(),
            "auth_timeout_secs" => self.auth_timeout_secs = seconds(value)?,
            "max_connections_per_ip" => self.max_connections_per_ip = whole(value)?,
            "max_handshakes_per_ip_per_sec" => self.max_handshakes_per_ip_per_sec = whole(value)?,
            "ip_limits_exempt" => self.ip_limits_exempt = cidr_list(value)?,
            "max_messages_per_sec" => self.max_messages_per_sec = whole(value)?,
            "max_messages_burst" => self.max_messages_burst = whole(value)?,
            "rate_limit_policy" => self.rate_limit_policy = value.parse()?,
            "max_control_frames_per_sec" => self.max_control_frames_per_sec = whole(value)?,
            "max_topics_per_connection" => self.max_topics_per_connection = whole(value)?,
            "max_topic_length" => self.max_topic_length = whole(value)?,
            "trusted_proxies" => self.trusted_proxies = cidr_list(value)?,
            "proxy_protocol" => self.proxy_protocol = boolean(value)?,
            "metrics_token" => self.metrics_token = value.trim().to_owned(),
            "metrics_bind" => {
                let value = value.trim();
                if !value.is_empty() {
                    value.parse::<SocketAddr>().map_err(|_| {
                        format!("not an address: {value:?} (expected IP:PORT, e.g. 127.0.0.1:9090)")
                    })?;
                }
                self.metrics_bind = value.to_owned();
            }
            "metrics_topics" => self.metrics_topics = whole(value)?,
            "max_inbound_memory" => self.max_inbound_memory = whole(value)?,
            "compression" => self.compression = value.parse()?,
            "compression_min_bytes" => self.compression_min_bytes = whole(value)?,
            "compression_level" => self.compression_level = whole(value)?,
            "compression_memory_limit" => self.compression_memory_limit = whole(value)?,
            "history_size" => self.history_size = whole(value)?,
            "history_ttl_secs" => self.history_ttl_secs = whole(value)?,
            "history_memory_limit" => self.history_memory_limit = whole(value)?,
            _ => return Err(format!("unknown setting {field:?}")),
        }
        Ok(name)
    }

    /// The value of `field` as TOML (what a file would say), secrets masked: the
    /// password in `redis_url` is shown as `***`.
    pub fn value_of(&self, field: &str) -> Option<String> {
        use toml::Value;
        let int = |n: usize| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let strings =
            |items: &[String]| Value::Array(items.iter().cloned().map(Value::String).collect());
        let masked = |secret: &str| {
            if secret.is_empty() {
                String::new()
            } else {
                MASK.to_owned()
            }
        };
        let value = match field {
            "bind" => Value::String(self.bind.to_string()),
            "workers" => int(self.workers),
            "max_connections" => int(self.max_connections),
            "handshake_timeout_secs" => Value::Float(self.handshake_timeout_secs),
            "defer_accept_secs" => Value::Integer(i64::from(self.defer_accept_secs)),
            "ping_interval_secs" => Value::Float(self.ping_interval_secs),
            "pong_timeout_secs" => Value::Float(self.pong_timeout_secs),
            "idle_timeout_secs" => Value::Float(self.idle_timeout_secs),
            "max_message_size" => int(self.max_message_size),
            "max_frame_size" => int(self.max_frame_size),
            "max_outbound_bytes" => int(self.max_outbound_bytes),
            "slow_consumer_policy" => Value::String(self.slow_consumer_policy.to_string()),
            "io_backend" => Value::String(self.io_backend.to_string()),
            "max_body_bytes" => int(self.max_body_bytes),
            "max_head_bytes" => int(self.max_head_bytes),
            "shutdown_timeout_secs" => Value::Float(self.shutdown_timeout_secs),
            "conflate_topics" => Value::Array(
                self.conflate_topics
                    .iter()
                    .cloned()
                    .map(Value::String)
                    .collect(),
            ),
            "conflate_window_ms" => {
                Value::Integer(i64::try_from(self.conflate_window_ms).unwrap_or(i64::MAX))
            }
            "redis_url" => Value::String(mask_url_password(&self.redis_url)),
            "redis_cluster" => Value::Boolean(self.redis_cluster),
            "redis_prefix" => Value::String(self.redis_prefix.clone()),
            "redis_backlog_messages" => int(self.redis_backlog_messages),
            "redis_backlog_bytes" => int(self.redis_backlog_bytes),
            "broker" => Value::String(self.broker_kind().as_str().to_owned()),
            "nats_url" => Value::String(
                self.nats_url
                    .split(',')
                    .map(mask_url_password)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            "task_threads" => int(self.task_threads),
            "task_queue_capacity" => int(self.task_queue_capacity),
            "task_nice" => Value::Integer(i64::from(self.task_nice)),
            "jobs_redis_url" => Value::String(mask_url_password(&self.jobs_redis_url)),
            "jobs_stream_prefix" => Value::String(self.jobs_stream_prefix.clone()),
            "job_max_attempts" => Value::Integer(i64::from(self.job_max_attempts)),
            "job_retry_backoff_ms" => {
                Value::Integer(i64::try_from(self.job_retry_backoff_ms).unwrap_or(i64::MAX))
            }
            "job_visibility_timeout_secs" => {
                Value::Integer(i64::try_from(self.job_visibility_timeout_secs).unwrap_or(i64::MAX))
            }
            "job_concurrency" => int(self.job_concurrency),
            "job_dead_letter_maxlen" => int(self.job_dead_letter_maxlen),
            "tls_cert" => Value::String(self.tls_cert.clone()),
            "tls_key" => Value::String(self.tls_key.clone()),
            "plain_bind" => Value::String(self.plain_bind.clone()),
            "allowed_origins" => strings(&self.allowed_origins),
            "publish_token" => Value::Array(
                self.publish_token
                    .iter()
                    .map(|_| Value::String(MASK.into()))
                    .collect(),
            ),
            "publish_token_file" => Value::String(self.publish_token_file.clone()),
            "jwt_secret" => Value::String(masked(&self.jwt_secret)),
            "jwt_public_key" => Value::String(self.jwt_public_key.clone()),
            "jwt_cookie" => Value::String(self.jwt_cookie.clone()),
            "auth_url" => Value::String(mask_url_password(&self.auth_url)),
            "auth_timeout_secs" => Value::Float(self.auth_timeout_secs),
            "max_connections_per_ip" => int(self.max_connections_per_ip),
            "max_handshakes_per_ip_per_sec" => {
                Value::Integer(i64::from(self.max_handshakes_per_ip_per_sec))
            }
            "ip_limits_exempt" => strings(&self.ip_limits_exempt),
            "max_messages_per_sec" => Value::Integer(i64::from(self.max_messages_per_sec)),
            "max_messages_burst" => Value::Integer(i64::from(self.max_messages_burst)),
            "rate_limit_policy" => Value::String(self.rate_limit_policy.to_string()),
            "max_control_frames_per_sec" => {
                Value::Integer(i64::from(self.max_control_frames_per_sec))
            }
            "max_topics_per_connection" => int(self.max_topics_per_connection),
            "max_topic_length" => int(self.max_topic_length),
            "trusted_proxies" => strings(&self.trusted_proxies),
            "proxy_protocol" => Value::Boolean(self.proxy_protocol),
            "metrics_token" => Value::String(masked(&self.metrics_token)),
            "metrics_bind" => Value::String(self.metrics_bind.clone()),
            "metrics_topics" => int(self.metrics_topics),
            "max_inbound_memory" => int(self.max_inbound_memory),
            "compression" => Value::String(self.compression.to_string()),
            "compression_min_bytes" => int(self.compression_min_bytes),
            "compression_level" => Value::Integer(i64::from(self.compression_level)),
            "compression_memory_limit" => int(self.compression_memory_limit),
            "history_size" => int(self.history_size),
            "history_ttl_secs" => {
                Value::Integer(i64::try_from(self.history_ttl_secs).unwrap_or(i64::MAX))
            }
            "history_memory_limit" => int(self.history_memory_limit),
            _ => return None,
        };
        Some(value.to_string())
    }

    /// Checks values that would make the server misbehave; the error names the field
    /// and its range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let secs = [
            ("handshake_timeout_secs", self.handshake_timeout_secs, false),
            ("ping_interval_secs", self.ping_interval_secs, false),
            ("pong_timeout_secs", self.pong_timeout_secs, false),
            ("idle_timeout_secs", self.idle_timeout_secs, true),
            ("shutdown_timeout_secs", self.shutdown_timeout_secs, true),
        ];
        for (name, value, zero_ok) in secs {
            if !value.is_finite() || value < 0.0 || (!zero_ok && value == 0.0) || value > 1e9 {
                let range = if zero_ok { "0" } else { "above 0" };
                return Err(ConfigError(format!(
                    "{name} must be a number of seconds, {range} up to 1e9, got {value}"
                )));
            }
        }
        range("workers", self.workers, 0, MAX_WORKERS)?;
        range("max_connections", self.max_connections, 1, usize::MAX)?;
        range(
            "max_message_size",
            self.max_message_size,
            1,
            MAX_MESSAGE_SIZE,
        )?;
        range("max_frame_size", self.max_frame_size, 1, MAX_MESSAGE_SIZE)?;
        range("max_outbound_bytes", self.max_outbound_bytes, 1, usize::MAX)?;
        let (low, high) = MAX_HEAD_BYTES_RANGE;
        range("max_head_bytes", self.max_head_bytes, low, high)?;
        range("conflate_window_ms", self.conflate_window_ms, 1, 60_000)?;
        range("defer_accept_secs", self.defer_accept_secs, 0, 3600)?;
        range("compression_level", self.compression_level, 0, 9)?;
        range("task_threads", self.task_threads, 1, 1024)?;
        range(
            "task_queue_capacity",
            self.task_queue_capacity,
            1,
            usize::MAX,
        )?;
        range("task_nice", self.task_nice, -20, 19)?;
        for topic in &self.conflate_topics {
            check_topic_pattern(topic).map_err(|e| ConfigError(format!("conflate_topics: {e}")))?;
        }
        if !self.redis_url.is_empty() {
            // A cluster's seeds: comma-separated, a bare host:port takes the first's scheme.
            let seeds: Vec<&str> = match self.redis_cluster {
                true => self.redis_url.split(',').map(str::trim).collect(),
                false => vec![self.redis_url.as_str()],
            };
            for seed in seeds {
                let url = match seed.contains("://") || !self.redis_cluster {
                    true => seed.to_owned(),
                    false => format!("redis://{seed}"),
                };
                check_redis_url(&url).map_err(|e| ConfigError(format!("redis_url: {e}")))?;
            }
            if self.redis_cluster && self.redis_prefix.contains(['{', '}']) {
                return Err(ConfigError(
                    "redis_prefix: no braces with redis_cluster (they would be every topic's hash tag)".into(),
                ));
            }
        } else if self.redis_cluster {
            return Err(ConfigError(
                "redis_cluster: needs redis_url (the seed nodes)".into(),
            ));
        }
        if !self.jobs_redis_url.is_empty() {
            check_redis_url(&self.jobs_redis_url)
                .map_err(|e| ConfigError(format!("jobs_redis_url: {e}")))?;
        }
        range("job_max_attempts", self.job_max_attempts, 1, 1_000)?;
        range(
            "job_retry_backoff_ms",
            self.job_retry_backoff_ms,
            1,
            3_600_000,
        )?;
        range(
            "job_visibility_timeout_secs",
            self.job_visibility_timeout_secs,
            1,
            86_400,
        )?;
        range("job_concurrency", self.job_concurrency, 0, 65_536)?;
        range(
            "job_dead_letter_maxlen",
            self.job_dead_letter_maxlen,
            1,
            usize::MAX,
        )?;
        range(
            "redis_backlog_messages",
            self.redis_backlog_messages,
            1,
            usize::MAX,
        )?;
        range(
            "redis_backlog_bytes",
            self.redis_backlog_bytes,
            1,
            usize::MAX,
        )?;
        match self.broker_kind() {
            BrokerKind::Redis if self.redis_url.is_empty() => {
                return Err(ConfigError(
                    "broker = redis needs redis_url (--redis, RINGSOCKET_REDIS_URL)".into(),
                ));
            }
            BrokerKind::Nats if self.nats_url.is_empty() => {
                return Err(ConfigError(
                    "broker = nats needs nats_url (--nats, RINGSOCKET_NATS_URL)".into(),
                ));
            }
            _ => {}
        }
        if !self.nats_url.is_empty() {
            crate::broker::nats::check_url(&self.nats_url)
                .map_err(|e| ConfigError(format!("nats_url: {e}")))?;
        }
        match (self.tls_cert.is_empty(), self.tls_key.is_empty()) {
            (false, true) => {
                return Err(ConfigError(
                    "tls_cert is set but tls_key is not: TLS needs both".into(),
                ));
            }
            (true, false) => {
                return Err(ConfigError(
                    "tls_key is set but tls_cert is not: TLS needs both".into(),
                ));
            }
            _ => {}
        }
        if !(self.auth_timeout_secs.is_finite()
            && self.auth_timeout_secs > 0.0
            && self.auth_timeout_secs <= 3600.0)
        {
            return Err(ConfigError(format!(
                "auth_timeout_secs must be a number of seconds, above 0 up to 3600, got {}",
                self.auth_timeout_secs
            )));
        }
        range(
            "max_topic_length",
            self.max_topic_length,
            1,
            MAX_TOPIC_LENGTH,
        )?;
        range(
            "max_topics_per_connection",
            self.max_topics_per_connection,
            1,
            MAX_TOPICS_PER_CONNECTION,
        )?;
        range(
            "max_inbound_memory",
            self.max_inbound_memory,
            64 << 10,
            usize::MAX,
        )?;
        range("history_size", self.history_size, 0, MAX_HISTORY_SIZE)?;
        range("history_ttl_secs", self.history_ttl_secs, 1, 7 * 86_400)?;
        range(
            "history_memory_limit",
            self.history_memory_limit,
            0,
            usize::MAX,
        )?;
        if !self.jwt_secret.is_empty() && !self.jwt_public_key.is_empty() {
            return Err(ConfigError(
                "jwt_secret and jwt_public_key are both set: tokens are verified with one \
                 key (HS256 with jwt_secret, or RS256/ES256 with jwt_public_key)"
                    .into(),
            ));
        }
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|scheme| self.auth_url.starts_with(scheme));
        if !self.auth_url.is_empty() && !scheme_ok {
            return Err(ConfigError(format!(
                "auth_url must start with http:// or https://, got {:?}",
                mask_url_password(&self.auth_url)
            )));
        }
        if let Some(token) = self.publish_token.iter().find(|t| t.len() < 16) {
            let _ = token;
            return Err(ConfigError(
                "publish_token: every token must be at least 16 characters (a guessable \
                 token is no protection); generate one with `openssl rand -hex 32`"
                    .into(),
            ));
        }
        if !self.metrics_token.is_empty() && self.metrics_token.len() < 16 {
            return Err(ConfigError(
                "metrics_token must be at least 16 characters (generate one with `openssl \
                 rand -hex 32`)"
                    .into(),
            ));
        }
        if let Some(metrics) = self.metrics_bind_addr()? {
            if metrics == self.bind && metrics.port() != 0 {
                return Err(ConfigError(format!(
                    "metrics_bind = {metrics} is the same address as bind"
                )));
            }
        }
        if let Some(plain) = self.plain_bind_addr()? {
            if self.tls_cert.is_empty() {
                return Err(ConfigError(
                    "plain_bind is set without TLS: it is the plain listener beside a TLS \
                     one (set tls_cert and tls_key, or leave plain_bind empty)"
                        .into(),
                ));
            }
            if plain == self.bind && plain.port() != 0 {
                return Err(ConfigError(format!(
                    "plain_bind = {plain} is the same address as bind"
                )));
            }
            if self.metrics_bind_addr()? == Some(plain) && plain.port() != 0 {
                return Err(ConfigError(format!(
                    "metrics_bind = {plain} is the same address as plain_bind"
                )));
            }
        }
        Ok(())
    }

    /// The certificate and key files, when TLS is configured.
    pub fn tls_files(&self) -> Option<CertFiles> {
        (!self.tls_cert.is_empty() && !self.tls_key.is_empty()).then(|| CertFiles {
            cert: self.tls_cert.clone().into(),
            key: self.tls_key.clone().into(),
        })
    }

    /// [`Config::plain_bind`] as an address, `None` when empty.
    pub fn plain_bind_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let value = self.plain_bind.trim();
        if value.is_empty() {
            return Ok(None);
        }
        value.parse().map(Some).map_err(|_| {
            ConfigError(format!(
                "plain_bind: not an address: {value:?} (expected IP:PORT)"
            ))
        })
    }

    /// [`Config::metrics_bind`] as an address, `None` when empty.
    pub fn metrics_bind_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let value = self.metrics_bind.trim();
        if value.is_empty() {
            return Ok(None);
        }
        value.parse().map(Some).map_err(|_| {
            ConfigError(format!(
                "metrics_bind: not an address: {value:?} (expected IP:PORT)"
            ))
        })
    }

    /// How long `auth_url` may take.
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.auth_timeout_secs)
    }

    /// The burst of `max_messages_per_sec`: `max_messages_burst`, or twice the rate
    /// when that is 0.
    pub fn messages_burst(&self) -> u32 {
        if self.max_messages_burst == 0 {
            self.max_messages_per_sec.saturating_mul(2)
        } else {
            self.max_messages_burst
        }
    }

    /// Values that are accepted but are probably not what was meant, each saying what
    /// is used instead. `serve` logs each at WARN; `ringsocket config` prints them.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if self.workers > cores {
            warnings.push(format!(
                "workers = {} but this machine has {cores} core(s): the workers share \
                 them, pinned round-robin; one worker per core (workers = 0) is faster",
                self.workers
            ));
        }
        if self.max_frame_size > self.max_message_size {
            warnings.push(format!(
                "max_frame_size = {} is above max_message_size = {}: a frame can be no \
                 larger than a message, so frames are limited to {} bytes",
                self.max_frame_size, self.max_message_size, self.max_message_size
            ));
        }
        if !self.bind.ip().is_loopback() {
            if self.allowed_origins.is_empty() {
                warnings.push(format!(
                    "allowed_origins is empty and bind = {} is not loopback: WebSocket \
                     handshakes from any web page's origin are accepted (cross-site \
                     WebSocket hijacking); list your sites' origins",
                    self.bind
                ));
            }
            if self.metrics_token.is_empty() && self.metrics_bind.is_empty() {
                warnings.push(format!(
                    "/metrics is open to anyone who reaches bind = {} (set metrics_token, \
                     or metrics_bind to a private address)",
                    self.bind
                ));
            }
        }
        let largest_publish = self.max_message_size.max(self.max_body_bytes);
        if self.broker_kind() != BrokerKind::Local && self.redis_backlog_bytes < largest_publish {
            warnings.push(format!(
                "redis_backlog_bytes = {} is below the largest message a client may \
                 publish ({largest_publish} bytes, max_message_size or max_body_bytes): \
                 such a message is always refused",
                self.redis_backlog_bytes
            ));
        }
        let kind = self.broker_kind();
        if !self.nats_url.is_empty() && kind != BrokerKind::Nats {
            warnings.push(format!(
                "nats_url is set but broker = {}: NATS is not used (set broker = nats)",
                kind.as_str()
            ));
        }
        if self.idle_timeout_secs > 0.0 && self.idle_timeout_secs < self.ping_interval_secs {
            warnings.push(format!(
                "idle_timeout_secs = {} is shorter than ping_interval_secs = {}: an idle \
                 connection is closed before it is ever pinged",
                self.idle_timeout_secs, self.ping_interval_secs
            ));
        }
        warnings
    }

    /// The effective configuration as TOML, every field with where its value came
    /// from (secrets masked), then the warnings: what `ringsocket config` prints.
    pub fn describe(&self, sources: &Sources) -> String {
        let mut out = String::from(
            "# ringsocket: the effective configuration; each value's source after it\n\
             # (precedence, lowest first: default, file, environment, flag)\n",
        );
        for field in FIELDS {
            let value = self.value_of(field).unwrap_or_default();
            let source = sources.of(field);
            let mut note = source.to_string();
            if field == "workers" && self.workers == 0 {
                note.push_str(&format!("; 0 = one per core: {} here", self.worker_count()));
            }
            if field == "broker" && self.broker.is_none() {
                note.push_str("; from redis_url");
            }
            if (field.ends_with("redis_url") || field == "nats_url") && value.contains("***") {
                note.push_str("; password masked");
            }
            out.push_str(&format!("{field} = {value}  # {note}\n"));
        }
        for warning in self.warnings() {
            out.push_str(&format!("# WARNING: {warning}\n"));
        }
        out
    }

    /// The broker in use: [`Config::broker`], or by default `redis` when `redis_url` is
    /// set, else `local`.
    pub fn broker_kind(&self) -> BrokerKind {
        self.broker.unwrap_or(if self.redis_url.is_empty() {
            BrokerKind::Local
        } else {
            BrokerKind::Redis
        })
    }

    /// [`Config::handshake_timeout_secs`] as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }

    /// [`Config::ping_interval_secs`] as a `Duration`.
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs_f64(self.ping_interval_secs)
    }

    /// [`Config::pong_timeout_secs`] as a `Duration`.
    pub fn pong_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pong_timeout_secs)
    }

    /// [`Config::idle_timeout_secs`] as a `Duration`, `None` when 0.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0.0).then(|| Duration::from_secs_f64(self.idle_timeout_secs))
    }

    /// [`Config::shutdown_timeout_secs`] as a `Duration`.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_timeout_secs)
    }

    /// [`Config::conflate_window_ms`] as a `Duration`.
    pub fn conflate_window(&self) -> Duration {
        Duration::from_millis(self.conflate_window_ms)
    }

    /// The number of workers to start: [`Config::workers`], or one per available core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The files of a TLS certificate and its key ([`Config::tls_cert`],
/// [`Config::tls_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM: the certificate, then its chain.
    pub cert: std::path::PathBuf,
    /// PEM: a PKCS#8, RSA (PKCS#1) or EC (SEC1) private key.
    pub key: std::path::PathBuf,
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// The built-in default.
    Default,
    /// The configuration file at this path.
    File(String),
    /// This environment variable.
    Env(String),
    /// This command-line flag.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "file {path}"),
            Self::Env(var) => write!(f, "env {var}"),
            Self::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Where each setting came from (fields not listed: the default).
#[derive(Debug, Clone, Default)]
pub struct Sources(BTreeMap<&'static str, Source>);

impl Sources {
    /// The source of `field`.
    pub fn of(&self, field: &str) -> Source {
        self.0.get(field).cloned().unwrap_or(Source::Default)
    }
}

/// Builds a [`Config`] from its sources, lowest precedence first, remembering where
/// each value came from.
#[derive(Debug, Clone, Default)]
pub struct Loader {
    config: Config,
    sources: Sources,
}

impl Loader {
    /// Starts from the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a TOML file.
    pub fn file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        self.toml(&text, Some(path))
    }

    /// Applies TOML text, from the file at `path` if it came from one (for messages
    /// and sources).
    fn toml(&mut self, text: &str, path: Option<&Path>) -> Result<(), ConfigError> {
        let place = |e: String| match path {
            Some(path) => ConfigError(format!("{}: {e}", path.display())),
            None => ConfigError(e),
        };
        let settings = toml_settings(text).map_err(|e| place(e.0))?;
        for (field, value) in settings {
            let name = self
                .config
                .set(&field, &value)
                .map_err(|e| place(format!("{field}: {e}")))?;
            if let Some(path) = path {
                self.sources
                    .0
                    .insert(name, Source::File(path.display().to_string()));
            }
        }
        Ok(())
    }

    /// Applies the `RINGSOCKET_<FIELD>` variables among `vars`.
    pub fn env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (key, value) in vars {
            let Some(field) = key.strip_prefix("RINGSOCKET_") else {
                continue;
            };
            let name = self
                .config
                .set(&field.to_ascii_lowercase(), &value)
                .map_err(|e| ConfigError(format!("{key}={value:?}: {e}")))?;
            self.sources.0.insert(name, Source::Env(key));
        }
        Ok(())
    }

    /// Applies a command-line flag (`flag` as the user wrote it, for messages).
    pub fn flag(&mut self, flag: &str, field: &str, value: &str) -> Result<(), ConfigError> {
        let name = self
            .config
            .set(field, value)
            .map_err(|e| ConfigError(format!("{flag}: {e}")))?;
        self.sources.0.insert(name, Source::Flag(flag.to_owned()));
        Ok(())
    }

    /// The configuration so far (not validated).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Validates the result and returns it with its sources.
    pub fn finish(self) -> Result<(Config, Sources), ConfigError> {
        self.config.validate()?;
        Ok((self.config, self.sources))
    }
}

/// The settings of a TOML document, each value as the text [`Config::set`] parses.
fn toml_settings(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e| ConfigError(format!("{e}")))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                array @ toml::Value::Array(_) => array.to_string(),
                other => {
                    return Err(ConfigError(format!(
                        "{key}: expected a value, got a {}",
                        other.type_str()
                    )));
                }
            };
            Ok((key, text))
        })
        .collect()
}

/// A whole number of any integer type.
fn whole<T: FromStr>(value: &str) -> Result<T, String> {
    value
        .trim()
        .replace('_', "")
        .parse()
        .map_err(|_| format!("expected a whole number, got {value:?}"))
}

/// A number of seconds (fractions allowed).
fn seconds(value: &str) -> Result<f64, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds, got {value:?}"))
}

/// A list of topic names or patterns: `a, b*` or TOML's `["a", "b*"]`.
fn topic_list(value: &str) -> Result<Vec<String>, String> {
    let trimmed = value.trim();
    let items: Vec<String> = if trimmed.starts_with('[') {
        let table: toml::Table = format!("v = {trimmed}")
            .parse()
            .map_err(|_| format!("not a list: {value:?} (write a,b* or [\"a\", \"b*\"])"))?;
        let Some(toml::Value::Array(items)) = table.get("v") else {
            return Err(format!("not a list: {value:?}"));
        };
        items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s.trim().to_owned()),
                other => Err(format!("expected topic names, got {other}")),
            })
            .collect::<Result<_, _>>()?
    } else {
        trimmed
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()
    };
    for item in &items {
        check_topic_pattern(item)?;
    }
    Ok(items)
}

/// A topic name, or a prefix followed by `*`: no quotes, brackets, spaces or control
/// characters (what they would mean is a list written wrong).
fn check_topic_pattern(topic: &str) -> Result<(), String> {
    let bad = topic
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '[' | ']'));
    if topic.is_empty() {
        return Err("an empty topic name".into());
    }
    if let Some(c) = bad {
        return Err(format!(
            "{topic:?} is not a topic name or pattern ({c:?} is not allowed; write a,b* \
             or [\"a\", \"b*\"])"
        ));
    }
    if topic.find('*').is_some_and(|i| i + 1 != topic.len()) {
        return Err(format!("{topic:?}: '*' may only end a pattern"));
    }
    Ok(())
}

/// What secrets are shown as.
const MASK: &str = "***";

/// A list of strings: `a, b` or TOML's `["a", "b"]`; empty items are left out.
fn string_list(value: &str) -> Result<Vec<String>, String> {
    let trimmed = value.trim();
    if trimmed.starts_with('[') {
        let table: toml::Table = format!("v = {trimmed}")
            .parse()
            .map_err(|_| "not a list (write a,b or [\"a\", \"b\"])".to_owned())?;
        let Some(toml::Value::Array(items)) = table.get("v") else {
            return Err("not a list".into());
        };
        items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => Ok(s.trim().to_owned()),
                _ => Err("expected a list of strings".to_owned()),
            })
            .filter(|item| item.as_ref().map_or(true, |s| !s.is_empty()))
            .collect()
    } else {
        Ok(trimmed
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect())
    }
}

/// A list of CIDRs (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
fn cidr_list(value: &str) -> Result<Vec<String>, String> {
    let items = string_list(value)?;
    for item in &items {
        parse_cidr(item)?;
    }
    Ok(items)
}

/// A CIDR: an address and the length of its prefix (a bare address: all of it).
pub fn parse_cidr(text: &str) -> Result<(std::net::IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("not a CIDR: {text:?} (expected e.g. 10.0.0.0/8 or ::1/128)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => len
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("not a CIDR: {text:?} (the prefix length is 0 to {max})"))?,
    };
    Ok((addr, len))
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
fn boolean(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got {value:?}")),
    }
}

/// An entry of `allowed_origins`: `scheme://host[:port]`, with `*.` allowed at the
/// start of the host, or `*.host` for any scheme.
fn check_origin_pattern(origin: &str) -> Result<(), String> {
    let host = match origin.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() => rest,
        Some(_) => return Err(format!("allowed_origins: {origin:?} has no scheme")),
        None if origin.starts_with("*.") => origin,
        None => {
            return Err(format!(
                "allowed_origins: {origin:?} is not an origin (write https://app.example.com, \
                 https://*.example.com or *.example.com)"
            ));
        }
    };
    if host.is_empty() || host.contains('/') || host.chars().skip(1).any(|c| c == '*') {
        return Err(format!(
            "allowed_origins: {origin:?} is not an origin (no path; '*' only as the first \
             label, as in https://*.example.com)"
        ));
    }
    Ok(())
}

fn range<T: PartialOrd + fmt::Display>(
    name: &str,
    value: T,
    low: T,
    high: T,
) -> Result<(), ConfigError> {
    if value < low || value > high {
        return Err(ConfigError(format!(
            "{name} must be between {low} and {high}, got {value}"
        )));
    }
    Ok(())
}

/// Whether `url` is a Redis URL the broker can use (`redis://`, `rediss://` or
/// `unix://`), without connecting.
fn check_redis_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    url.into_connection_info()
        .map(drop)
        .map_err(|e| format!("{:?}: {e}", mask_url_password(url)))
}

/// `url` with the password of its user info, and the value of a `pass` or `password`
/// query parameter (`redis+unix:///run/redis.sock?pass=…`), replaced by `***`, for
/// logs and `ringsocket config`. A comma-separated list (the seed nodes of `redis_cluster`) has
/// every item masked, a bare `user:password@host:port` item too.
pub fn mask_url_password(url: &str) -> String {
    // The items of a list. A comma inside a user info belongs to its URL: when a URL
    // shows no `@` but a bare item after it (before the next URL) does, they are one
    // item, so no part of a password shows on its own.
    let has_at = |item: &str| authority(item).is_some_and(|a| a.contains('@'));
    let parts: Vec<&str> = url.split(',').collect();
    let mut items: Vec<String> = Vec::new();
    let mut at = 0;
    while at < parts.len() {
        let mut end = at;
        if parts[at].contains("://") && !has_at(parts[at]) {
            if let Some(j) = parts[at + 1..]
                .iter()
                .take_while(|p| !p.contains("://"))
                .position(|p| has_at(p))
            {
                end = at + 1 + j;
            }
        }
        items.push(parts[at..=end].join(","));
        at = end + 1;
    }
    items
        .iter()
        .map(|item| mask_one_url(item))
        .collect::<Vec<_>>()
        .join(",")
}

/// The authority of `url` (after the scheme, up to the path), or the whole of a bare
/// `host:port`-like item.
fn authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next()
}

/// [`mask_url_password`] of one URL, or of one bare `[user:password@]host:port`.
fn mask_one_url(url: &str) -> String {
    let url = mask_query_password(url);
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url.as_str()),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url;
    };
    let user_info = &rest[..at];
    let masked = match user_info.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // `redis://password@host` is also read as a password.
        None if !user_info.is_empty() => "***".to_owned(),
        None => String::new(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{masked}{}", &rest[at..]),
        None => format!("{masked}{}", &rest[at..]),
    }
}

/// `url` with the values of its `pass` and `password` query parameters masked.
fn mask_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((name, _))
                if name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password") =>
            {
                format!("{name}=***")
            }
            _ => param.to_owned(),
        })
        .collect();
    let mut out = format!("{base}?{}", params.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_defaults_to_redis_with_a_url_and_needs_its_url() {
        let mut config = Config::default();
        assert_eq!(config.broker_kind(), BrokerKind::Local);
        config.redis_url = "redis://127.0.0.1:6379".into();
        assert_eq!(config.broker_kind(), BrokerKind::Redis);
        assert_eq!(config.value_of("broker").as_deref(), Some("\"redis\""));
        config.set("broker", "nats").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "broker = nats needs nats_url (--nats, RINGSOCKET_NATS_URL)"
        );
        config
            .set("nats_url", "nats://app:secret@127.0.0.1:4222")
            .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.value_of("nats_url").as_deref(),
            Some("\"nats://app:***@127.0.0.1:4222\"")
        );
        config.set("broker", "redis").unwrap();
        assert!(
            config
                .warnings()
                .iter()
                .any(|w| w.contains("nats_url is set"))
        );
        config.redis_url.clear();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("broker = redis needs redis_url"), "{err}");
        assert!(
            config
                .set("broker", "kafka")
                .unwrap_err()
                .contains("local, redis or nats")
        );
        config.set("nats_url", "http://x").unwrap();
        config.set("broker", "nats").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("nats_url: invalid NATS URL"), "{err}");
    }

    /// The access and abuse settings read the same from the file and `--set`, check
    /// their values, and never print a secret.
    #[test]
    fn access_settings_are_parsed_checked_and_masked() {
        let config = Config::from_toml(
            "allowed_origins = [\"https://app.example.com\", \"https://*.example.com\"]\n\
             publish_token = \"0123456789abcdef0123, fedcba9876543210fedc\"\n\
             jwt_secret = \"s3cr3t-s3cr3t-s3cr3t\"\n\
             metrics_token = \"m3tr1cs-m3tr1cs-m3\"\n\
             trusted_proxies = \"10.0.0.0/8, ::1\"\n\
             proxy_protocol = true\n\
             rate_limit_policy = \"drop\"\n\
             max_messages_per_sec = 10\n",
        )
        .unwrap();
        assert_eq!(config.allowed_origins.len(), 2);
        assert_eq!(config.publish_token.len(), 2);
        assert_eq!(config.trusted_proxies, ["10.0.0.0/8", "::1"]);
        assert!(config.proxy_protocol);
        assert_eq!(config.rate_limit_policy, RateLimitPolicy::Drop);
        assert_eq!(config.messages_burst(), 20);
        config.validate().unwrap();
        for (field, secret) in [
            ("publish_token", "0123456789abcdef0123"),
            ("jwt_secret", "s3cr3t"),
            ("metrics_token", "m3tr1cs"),
        ] {
            let shown = config.value_of(field).unwrap();
            assert!(!shown.contains(secret), "{field}: {shown}");
            assert!(shown.contains("***"), "{field}: {shown}");
        }
        let mut config = Config::default();
        for (field, value, says) in [
            ("allowed_origins", "example.com", "is not an origin"),
            (
                "allowed_origins",
                "https://a.*.example.com",
                "'*' only as the first",
            ),
            ("trusted_proxies", "10.0.0.0/33", "prefix length"),
            ("trusted_proxies", "proxy.local", "not a CIDR"),
            ("proxy_protocol", "maybe", "true or false"),
            ("rate_limit_policy", "ban", "close or drop"),
            ("metrics_bind", "localhost", "not an address"),
        ] {
            let err = config.set(field, value).unwrap_err();
            assert!(err.contains(says), "{field}={value}: {err}");
        }
        for (field, value, says) in [
            ("publish_token", "short", "at least 16"),
            ("metrics_token", "short", "at least 16"),
            (
                "max_topic_length",
                "300",
                "max_topic_length must be between 1 and 256",
            ),
            ("auth_url", "ftp://x", "http:// or https://"),
        ] {
            let mut config = Config::default();
            config.set(field, value).unwrap();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{field}={value}: {err}");
        }
        let mut both = Config::default();
        both.set("jwt_secret", "x").unwrap();
        both.set("jwt_public_key", "key.pem").unwrap();
        assert!(
            both.validate()
                .unwrap_err()
                .to_string()
                .contains("both set")
        );
    }

    /// On a public address, an open origin policy and a public `/metrics` are warned
    /// about; on loopback they are not.
    #[test]
    fn public_bind_without_access_rules_is_warned_about() {
        let mut config = Config::default();
        assert!(config.warnings().is_empty());
        config.set("bind", "0.0.0.0:9001").unwrap();
        let warnings = config.warnings().join("\n");
        assert!(warnings.contains("allowed_origins is empty"), "{warnings}");
        assert!(warnings.contains("/metrics is open"), "{warnings}");
        config
            .set("allowed_origins", "https://app.example.com")
            .unwrap();
        config.set("metrics_bind", "127.0.0.1:9090").unwrap();
        assert!(config.warnings().is_empty());
    }

    /// The metrics listener cannot be the plain one beside TLS either.
    #[test]
    fn metrics_bind_and_plain_bind_must_differ() {
        let mut config = Config {
            tls_cert: "cert.pem".into(),
            tls_key: "key.pem".into(),
            ..Config::default()
        };
        config.set("plain_bind", "127.0.0.1:8080").unwrap();
        config.set("metrics_bind", "127.0.0.1:8080").unwrap();
        let err = config.validate().unwrap_err().0;
        assert_eq!(
            err,
            "metrics_bind = 127.0.0.1:8080 is the same address as plain_bind"
        );
        config.set("metrics_bind", "127.0.0.1:9090").unwrap();
        assert!(config.validate().is_ok());
    }

    #[test]
    fn file_then_env_override_defaults() {
        let mut config = Config::from_toml("bind = \"0.0.0.0:8000\"\nworkers = 3\n").unwrap();
        assert_eq!(config.workers, 3);
        assert_eq!(config.ping_interval_secs, 25.0);
        config
            .apply_env([
                ("RINGSOCKET_WORKERS".to_owned(), "5".to_owned()),
                ("PATH".to_owned(), "/bin".to_owned()),
            ])
            .unwrap();
        assert_eq!(config.workers, 5);
        assert_eq!(config.bind.port(), 8000);
    }

    #[test]
    fn conflated_topics_are_a_list() {
        let mut config = Config::from_toml("conflate_topics = [\"cursor\"]\n").unwrap();
        assert_eq!(config.conflate_topics, ["cursor"]);
        config.set("conflate_topics", "a, prices:*,").unwrap();
        assert_eq!(config.conflate_topics, ["a", "prices:*"]);
        config.set("conflate_window_ms", "0").unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut config = Config::default();
        let err = config
            .apply_env([("RINGSOCKET_WORKERS".to_owned(), "many".to_owned())])
            .unwrap_err();
        assert!(err.0.contains("RINGSOCKET_WORKERS"), "{err}");
        let err = Config::from_toml("colour = 1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        config.pong_timeout_secs = 0.0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("pong_timeout_secs")
        );
    }

    /// `io_backend` (issue: epoll backend): `auto` by default, the same spellings in
    /// the file and the environment, printed canonically, and a clear error.
    #[test]
    fn io_backend_reads_the_same_everywhere() {
        assert_eq!(Config::default().io_backend, IoBackend::Auto);
        for (spelling, backend) in [
            ("io_uring", IoBackend::IoUring),
            ("io-uring", IoBackend::IoUring),
            ("IOURING", IoBackend::IoUring),
            ("epoll", IoBackend::Epoll),
            ("Auto", IoBackend::Auto),
        ] {
            let file = Config::from_toml(&format!("io_backend = \"{spelling}\"")).unwrap();
            assert_eq!(file.io_backend, backend);
            let mut env = Config::default();
            env.apply_env([("RINGSOCKET_IO_BACKEND".into(), spelling.into())])
                .unwrap();
            assert_eq!(env.io_backend, backend);
        }
        let config = Config::from_toml("io_backend = \"io-uring\"").unwrap();
        assert_eq!(
            config.value_of("io_backend").as_deref(),
            Some("\"io_uring\"")
        );
        let err = Config::from_toml("io_backend = \"kqueue\"").unwrap_err();
        assert!(err.0.contains("expected auto, io_uring or epoll"), "{err}");
        assert!(err.0.contains("io_backend"), "names the setting: {err}");
    }

    #[test]
    fn slow_consumer_policy_reads_the_same_everywhere() {
        for spelling in ["close-1008", "close1008", "CLOSE_1008", "1008"] {
            let file =
                Config::from_toml(&format!("slow_consumer_policy = \"{spelling}\"")).unwrap();
            assert_eq!(file.slow_consumer_policy, SlowConsumerPolicy::Close1008);
            let mut env = Config::default();
            env.apply_env([("RINGSOCKET_SLOW_CONSUMER_POLICY".into(), spelling.into())])
                .unwrap();
            assert_eq!(env.slow_consumer_policy, SlowConsumerPolicy::Close1008);
        }
        let config = Config::from_toml("slow_consumer_policy = \"close1013\"").unwrap();
        assert_eq!(
            config.value_of("slow_consumer_policy").as_deref(),
            Some("\"close-1013\""),
            "printed in its canonical spelling"
        );
        let err = Config::from_toml("slow_consumer_policy = \"close-1011\"").unwrap_err();
        assert!(err.0.contains("close-1013 or close-1008"), "{err}");
    }

    #[test]
    fn lists_read_the_same_from_file_env_and_set() {
        let file = Config::from_toml("conflate_topics = [\"a*\", \"b\"]").unwrap();
        let mut set = Config::default();
        set.set("conflate_topics", "[\"a*\", \"b\"]").unwrap();
        let mut plain = Config::default();
        plain.set("conflate_topics", "a*, b").unwrap();
        assert_eq!(file.conflate_topics, ["a*", "b"]);
        assert_eq!(set.conflate_topics, file.conflate_topics);
        assert_eq!(plain.conflate_topics, file.conflate_topics);
        // What used to become a literal topic named `["a*"]`.
        let err = Config::default()
            .set("conflate_topics", "[\"a*\"")
            .unwrap_err();
        assert!(err.contains("not a list"), "{err}");
        let err = Config::default()
            .set("conflate_topics", "\"a*\"")
            .unwrap_err();
        assert!(err.contains("not a topic name"), "{err}");
        let err = Config::default().set("conflate_topics", "a*b").unwrap_err();
        assert!(err.contains("may only end"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_errors_naming_the_range() {
        let mut config = Config::default();
        config.set("max_head_bytes", "1000000").unwrap();
        let err = config.validate().unwrap_err();
        assert!(
            err.0
                .contains("max_head_bytes must be between 512 and 65535, got 1000000"),
            "{err}"
        );
        let mut config = Config::default();
        config.set("workers", "5000").unwrap();
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("between 0 and 1024")
        );
        let err = Config::default().set("workers", "1.5").unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        let err = Config::from_toml("workers = 1.5").unwrap_err();
        assert!(
            err.0.contains("workers") && err.0.contains("whole number"),
            "{err}"
        );
    }

    #[test]
    fn accepted_surprises_are_warned_about() {
        let mut config = Config::default();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        config.workers = 64;
        config.max_frame_size = 2 << 20;
        let warnings = config.warnings();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("workers = 64") && w.contains("core")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("frames are limited to 1048576")),
            "{warnings:?}"
        );
    }

    #[test]
    fn the_loader_records_each_values_source_and_masks_secrets() {
        let dir = std::env::temp_dir().join(format!("ringsocket-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ringsocket.toml");
        std::fs::write(&path, "workers = 2\nping_interval_secs = 5\n").unwrap();
        let mut loader = Loader::new();
        loader.file(&path).unwrap();
        loader
            .env([
                ("RINGSOCKET_PING_INTERVAL_SECS".into(), "7".into()),
                (
                    "RINGSOCKET_REDIS_URL".into(),
                    "redis://app:s3cret@127.0.0.1:6379/0".into(),
                ),
            ])
            .unwrap();
        loader.flag("--bind", "bind", "0.0.0.0:9100").unwrap();
        let (config, sources) = loader.finish().unwrap();
        assert_eq!(
            sources.of("workers"),
            Source::File(path.display().to_string())
        );
        assert_eq!(
            sources.of("ping_interval_secs"),
            Source::Env("RINGSOCKET_PING_INTERVAL_SECS".into())
        );
        assert_eq!(sources.of("bind"), Source::Flag("--bind".into()));
        assert_eq!(sources.of("max_body_bytes"), Source::Default);
        let text = config.describe(&sources);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("redis_url = \"redis://app:***@127.0.0.1:6379/0\"  # env RINGSOCKET_REDIS_URL; password masked"),
            "{text}"
        );
        assert!(
            text.contains("bind = \"0.0.0.0:9100\"  # flag --bind"),
            "{text}"
        );
        assert!(text.contains("ping_interval_secs = 7.0  # env"), "{text}");
        assert!(
            text.contains("max_body_bytes = 1048576  # default"),
            "{text}"
        );
        // What it prints is a configuration file again (once the password is put back).
        // `broker` is printed as in effect (redis, from redis_url), then read as set.
        let reread = Config::from_toml(&text.replace("***", "s3cret")).unwrap();
        assert_eq!(
            reread,
            Config {
                broker: Some(config.broker_kind()),
                ..config.clone()
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn passwords_are_masked_in_urls() {
        for (url, masked) in [
            ("redis://u:p@h:1/2", "redis://u:***@h:1/2"),
            ("redis://:p@h", "redis://:***@h"),
            ("rediss://p@h", "rediss://***@h"),
            ("redis://h:6379", "redis://h:6379"),
            ("redis://h/a@b", "redis://h/a@b"),
            (
                "redis+unix:///run/r.sock?db=1&pass=s3cret",
                "redis+unix:///run/r.sock?db=1&pass=***",
            ),
            (
                "redis://u:p@h/0?password=x#f",
                "redis://u:***@h/0?password=***#f",
            ),
            ("", ""),
            // redis_cluster seeds: every one masked.
            (
                "redis://:p1@h1:7000,redis://u:p2@h2:7000, rediss://p3@h3",
                "redis://:***@h1:7000,redis://u:***@h2:7000, rediss://***@h3",
            ),
            (
                "redis://:p@h1:7000,h2:7001,u:q@h3:7002",
                "redis://:***@h1:7000,h2:7001,u:***@h3:7002",
            ),
            // A comma in a password: no piece of it shows.
            ("redis://u:a,b@h:1", "redis://u:***@h:1"),
            (
                "redis://u:a,b,c@h:1,redis://:d,e@h:2",
                "redis://u:***@h:1,redis://:***@h:2",
            ),
        ] {
            assert_eq!(mask_url_password(url), masked);
        }
        for url in [
            "redis://:s3cret@h1:7000,redis://:s3cret@h2:7000,h3:7000",
            "redis://u:s3,cret@h1:7000,u:s3cret@h2:7000",
        ] {
            let masked = mask_url_password(url);
            assert!(!masked.contains("s3"), "{masked}");
            assert!(!masked.contains("cret"), "{masked}");
        }
    }

    #[test]
    fn redis_settings_from_file_env_and_set() {
        let config = Config::default();
        assert_eq!(config.redis_url, "");
        assert_eq!(config.redis_prefix, "ringsocket:");
        let mut config =
            Config::from_toml("redis_url = \"redis://10.0.0.1:6380/2\"\nredis_prefix = \"app:\"\n")
                .unwrap();
        assert_eq!(config.redis_url, "redis://10.0.0.1:6380/2");
        assert_eq!(config.redis_prefix, "app:");
        config.validate().unwrap();
        config
            .apply_env([(
                "RINGSOCKET_REDIS_URL".to_owned(),
                " redis://127.0.0.1:7000 ".to_owned(),
            )])
            .unwrap();
        assert_eq!(config.redis_url, "redis://127.0.0.1:7000");
        config.set("redis_prefix", "other:").unwrap();
        assert_eq!(config.redis_prefix, "other:");
        config.set("redis_url", "http://nope").unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.0.contains("redis_url"), "{err}");
        // Redis Cluster: comma-separated seeds, bare host:port after the first.
        assert!(!Config::default().redis_cluster);
        let mut config = Config::from_toml(
            "redis_url = \"redis://:pw@10.0.0.1:7000, 10.0.0.2:7001\"\nredis_cluster = true\n",
        )
        .unwrap();
        assert!(config.redis_cluster);
        config.validate().unwrap();
        config.set("redis_url", "redis://h:1,,h:2").unwrap();
        assert!(config.validate().unwrap_err().0.contains("redis_url"));
        config.set("redis_url", "redis://h:1").unwrap();
        config.set("redis_prefix", "{app}:").unwrap();
        assert!(config.validate().unwrap_err().0.contains("redis_prefix"));
        config.set("redis_url", "").unwrap();
        assert!(config.validate().unwrap_err().0.contains("redis_cluster"));
    }

    #[test]
    fn redis_backlog_settings_from_file_env_and_set() {
        let config = Config::default();
        assert_eq!(config.redis_backlog_messages, 65_536);
        assert_eq!(config.redis_backlog_bytes, 64 << 20);
        let mut config = Config::from_toml(
            "redis_url = \"redis://127.0.0.1:6379\"\nredis_backlog_messages = 10\n",
        )
        .unwrap();
        assert_eq!(config.redis_backlog_messages, 10);
        config
            .apply_env([(
                "RINGSOCKET_REDIS_BACKLOG_BYTES".to_owned(),
                "2097152".to_owned(),
            )])
            .unwrap();
        assert_eq!(config.redis_backlog_bytes, 2 << 20);
        config.validate().unwrap();
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        assert_eq!(
            config.value_of("redis_backlog_messages").as_deref(),
            Some("10")
        );
        let redis = crate::broker::redis::RedisConfig::from_config(&config).unwrap();
        assert_eq!(
            (redis.publish_queue, redis.publish_queue_bytes),
            (10, 2 << 20)
        );
        // Below the largest message a client may publish: every such one is refused.
        config.set("redis_backlog_bytes", "4096").unwrap();
        assert!(
            config
                .warnings()
                .iter()
                .any(|w| w.contains("redis_backlog_bytes = 4096")),
            "{:?}",
            config.warnings()
        );
        config.set("redis_backlog_messages", "0").unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.0.contains("redis_backlog_messages"), "{err}");
        let err = Config::default()
            .set("redis_backlog_bytes", "lots")
            .unwrap_err();
        assert!(err.contains("whole number"), "{err}");
    }

    #[test]
    fn task_settings_are_checked() {
        let mut config = Config::default();
        config.set("task_threads", "3").unwrap();
        config.set("task_nice", "-5").unwrap();
        assert_eq!((config.task_threads, config.task_nice), (3, -5));
        config.task_nice = 25;
        assert!(config.validate().unwrap_err().0.contains("task_nice"));
        config.task_nice = 0;
        config.task_queue_capacity = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .0
                .contains("task_queue_capacity")
        );
    }

    /// The durable-job settings parse, and a value out of range names the setting.
    #[test]
    fn job_settings_are_checked() {
        let mut config = Config::default();
        config.set("job_max_attempts", "3").unwrap();
        config.set("job_concurrency", "0").unwrap();
        config
            .set("jobs_redis_url", "redis://:secret@127.0.0.1:6390")
            .unwrap();
        assert_eq!((config.job_max_attempts, config.job_concurrency), (3, 0));
        assert!(config.validate().is_ok());
        assert!(
            !config
                .value_of("jobs_redis_url")
                .unwrap()
                .contains("secret")
        );
        for (field, value) in [
            ("job_max_attempts", "0"),
            ("job_retry_backoff_ms", "0"),
            ("job_visibility_timeout_secs", "0"),
            ("job_dead_letter_maxlen", "0"),
            ("jobs_redis_url", "http://x"),
        ] {
            let mut config = Config::default();
            config.set(field, value).unwrap();
            let err = config.validate().unwrap_err();
            assert!(err.0.starts_with(field), "{field}: {err}");
        }
        assert!(Config::default().set("job_concurrency", "-1").is_err());
    }
}
