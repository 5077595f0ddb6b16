//! The server's counters and their OpenMetrics exposition (`GET /metrics`).
//!
//! Each worker owns one [`WorkerMetrics`] and is its only writer (relaxed atomic adds on
//! memory no other core writes, so the message path shares no cache line and takes no
//! lock). Nothing of `prometheus-client` is on that path: at scrape time, collectors
//! ([`Collector`]) sum every worker's counters and hand them to its OpenMetrics text
//! encoder. [`Metrics`] is the workers' collector; the executor, the pubsub hub and the
//! broker have theirs, and [`process::ProcessCollector`] reads `/proc`.

pub mod process;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The prefix of every ringsocket metric name (`ringsocket_…`); the standard
/// `process_*` metrics have none.
pub const PREFIX: &str = "ringsocket";

/// The `Content-Type` of the exposition: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The OpenMetrics text exposition of `registry`, ending with `# EOF`.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::with_capacity(8192);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Why a connection ended; every way out is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The WebSocket closing handshake completed (either side started it).
    Normal,
    /// An HTTP connection ended: `Connection: close`, or the peer closed between requests.
    HttpDone,
    /// The peer broke RFC 6455 (close 1002/1007/1009).
    ProtocolError,
    /// The request head did not arrive within the handshake timeout.
    HandshakeTimeout,
    /// A pinged peer did not answer within the pong timeout.
    PongTimeout,
    /// No data message within the idle timeout.
    IdleTimeout,
    /// The peer queued more outbound bytes than allowed.
    SlowConsumer,
    /// The server shut down.
    Shutdown,
    /// The peer closed TCP without a close handshake.
    PeerGone,
    /// A socket error.
    IoError,
    /// The handshake or request was refused with an HTTP error status, or a WebSocket
    /// was closed by an abuse limit (`max_messages_per_sec`,
    /// `max_control_frames_per_sec`, `max_inbound_memory`; see `rejections_total`).
    Rejected,
}

impl CloseReason {
    const ALL: [CloseReason; 11] = [
        Self::Normal,
        Self::HttpDone,
        Self::ProtocolError,
        Self::HandshakeTimeout,
        Self::PongTimeout,
        Self::IdleTimeout,
        Self::SlowConsumer,
        Self::Shutdown,
        Self::PeerGone,
        Self::IoError,
        Self::Rejected,
    ];

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::HttpDone => "http_done",
            Self::ProtocolError => "protocol_error",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::PongTimeout => "pong_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::SlowConsumer => "slow_consumer",
            Self::Shutdown => "shutdown",
            Self::PeerGone => "peer_gone",
            Self::IoError => "io_error",
            Self::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a TLS handshake failed, as counted in
/// `ringsocket_tls_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The first bytes were not a TLS handshake record (plain HTTP on the TLS port, or
    /// garbage).
    NotTls,
    /// A malformed or unexpected TLS message.
    Protocol,
    /// No TLS version, cipher suite, group or signature scheme both sides support.
    Incompatible,
    /// The client offered ALPN protocols, none of them `http/1.1`.
    Alpn,
    /// The client sent an alert (it rejected our certificate, say).
    AlertReceived,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// The peer closed the connection in the middle of the handshake.
    Eof,
    /// Reading or writing the socket failed.
    Io,
    /// Anything else rustls refused.
    Other,
}

impl TlsFailure {
    /// Every reason, for the metric's labels.
    pub const ALL: [TlsFailure; 9] = [
        Self::NotTls,
        Self::Protocol,
        Self::Incompatible,
        Self::Alpn,
        Self::AlertReceived,
        Self::Timeout,
        Self::Eof,
        Self::Io,
        Self::Other,
    ];

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::Protocol => "protocol",
            Self::Incompatible => "incompatible",
            Self::Alpn => "alpn",
            Self::AlertReceived => "alert_received",
            Self::Timeout => "timeout",
            Self::Eof => "eof",
            Self::Io => "io",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Why a client was refused by an access rule or an abuse limit, as counted in
/// `ringsocket_rejections_total{reason}`: the handshake or request got an HTTP error
/// before any upgrade, or the WebSocket was closed (the code is named per reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rejection {
    /// The handshake's `Origin` is not in `allowed_origins`: 403.
    Origin,
    /// A JWT is needed and is missing, malformed, badly signed, expired or not yet
    /// valid: 401.
    Unauthorized,
    /// The token (or the `authorize` hook) does not allow the topic: 403.
    Topic,
    /// `POST /publish` without the right bearer token: 401 or 403.
    PublishToken,
    /// A client published to a topic its token does not allow: close 1008.
    PublishNotAllowed,
    /// The connection's token expired: close 1008 "token expired".
    TokenExpired,
    /// `auth_url` or the `authorize` hook refused (or did not answer in time).
    AuthHook,
    /// `max_connections_per_ip`: 429.
    ConnectionsPerIp,
    /// `max_handshakes_per_ip_per_sec`: 429.
    HandshakesPerIp,
    /// `max_messages_per_sec`: close 1008 "rate limit", or the message dropped.
    RateLimit,
    /// `max_control_frames_per_sec`: close 1008.
    ControlFrames,
    /// `max_topics_per_connection`: the subscription is refused.
    TopicsPerConnection,
    /// A topic name too long or with a character outside the allowed set: 400.
    TopicName,
    /// `max_inbound_memory`: close 1013.
    InboundMemory,
    /// A connection without a valid PROXY protocol header (`proxy_protocol`).
    ProxyProtocol,
    /// `GET /metrics` without the right `metrics_token`: 401 or 403.
    MetricsToken,
}

impl Rejection {
    /// Every reason, for the metric's labels.
    pub const ALL: [Rejection; 16] = [
        Self::Origin,
        Self::Unauthorized,
        Self::Topic,
        Self::PublishToken,
        Self::PublishNotAllowed,
        Self::TokenExpired,
        Self::AuthHook,
        Self::ConnectionsPerIp,
        Self::HandshakesPerIp,
        Self::RateLimit,
        Self::ControlFrames,
        Self::TopicsPerConnection,
        Self::TopicName,
        Self::InboundMemory,
        Self::ProxyProtocol,
        Self::MetricsToken,
    ];

    /// The metric's label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Unauthorized => "unauthorized",
            Self::Topic => "topic",
            Self::PublishToken => "publish_token",
            Self::PublishNotAllowed => "publish_not_allowed",
            Self::TokenExpired => "token_expired",
            Self::AuthHook => "auth_hook",
            Self::ConnectionsPerIp => "connections_per_ip",
            Self::HandshakesPerIp => "handshakes_per_ip",
            Self::RateLimit => "rate_limit",
            Self::ControlFrames => "control_frames",
            Self::TopicsPerConnection => "topics_per_connection",
            Self::TopicName => "topic_name",
            Self::InboundMemory => "inbound_memory",
            Self::ProxyProtocol => "proxy_protocol",
            Self::MetricsToken => "metrics_token",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Rejections, shared by every thread that refuses clients (the workers, the app's
/// access rules). Unlike the per-worker counters these are written from any core:
/// a rejection is rare next to a message, and the cost of a shared cache line is
/// paid only by refused clients.
#[derive(Debug, Default)]
pub struct Rejections([AtomicU64; Rejection::ALL.len()]);

impl Rejections {
    /// Counts one rejection for `reason`.
    pub fn add(&self, reason: Rejection) {
        self.0[reason.index()].fetch_add(1, Relaxed);
    }

    /// Rejections so far for `reason`.
    pub fn get(&self, reason: Rejection) -> u64 {
        self.0[reason.index()].load(Relaxed)
    }
}

/// A limit that was reached (ARCHITECTURE.md rule 5: every limit has a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// `max_connections`: 503.
    MaxConnections,
    /// Frame or message size: close 1009.
    MessageSize,
    /// Queued outbound bytes: slow consumer.
    OutboundBytes,
    /// HTTP body size: 413.
    BodySize,
    /// Request head size or header count: 431.
    HeadSize,
    /// `max_inbound_memory`, the process's budget for partly received messages:
    /// close 1013.
    InboundMemory,
}

impl Limit {
    const ALL: [Limit; 6] = [
        Self::MaxConnections,
        Self::MessageSize,
        Self::OutboundBytes,
        Self::BodySize,
        Self::HeadSize,
        Self::InboundMemory,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MessageSize => "max_message_size",
            Self::OutboundBytes => "max_outbound_bytes",
            Self::BodySize => "max_body_bytes",
            Self::HeadSize => "max_head_bytes",
            Self::InboundMemory => "max_inbound_memory",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|l| *l == self).unwrap_or(0)
    }
}

/// Upper bounds, in seconds, of the `broadcast_pass_seconds` histogram's buckets (the
/// last bucket, `+Inf`, takes the rest).
pub const PASS_BUCKETS: [f64; 12] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A handler whose panic was caught (it ended its own request or connection only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandlerKind {
    /// A WebSocket handler: Close 1011, or 500 when it panicked before accepting.
    WebSocket,
    /// An HTTP handler: 500.
    Http,
}

impl HandlerKind {
    const ALL: [HandlerKind; 2] = [Self::WebSocket, Self::Http];

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Http => "http",
        }
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// Statuses exposed even before they are first written (at 0), so that a rate over
/// them exists from the start; any other status appears once written.
const SHOWN_STATUSES: [u16; 15] = [
    101, 200, 202, 204, 400, 403, 404, 405, 408, 411, 413, 426, 431, 500, 503,
];

/// The lowest status counted on its own; [`StatusCounts`] holds `100..=599`.
const FIRST_STATUS: u16 = 100;
/// Statuses `100..=599`, then one slot for anything outside that range.
const STATUS_SLOTS: usize = 500;

/// Responses written, per status: one slot per status in `100..=599`, the last slot for
/// a status outside it.
struct StatusCounts([AtomicU64; STATUS_SLOTS + 1]);

impl StatusCounts {
    fn add(&self, status: u16) {
        self.0[Self::slot(status)].fetch_add(1, Relaxed);
    }

    fn slot(status: u16) -> usize {
        usize::from(status)
            .checked_sub(usize::from(FIRST_STATUS))
            .filter(|i| *i < STATUS_SLOTS)
            .unwrap_or(STATUS_SLOTS)
    }
}

impl Default for StatusCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl fmt::Debug for StatusCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = (FIRST_STATUS..)
            .zip(&self.0[..STATUS_SLOTS])
            .map(|(status, n)| (status, n.load(Relaxed)))
            .filter(|(_, n)| *n > 0);
        f.debug_map().entries(seen).finish()
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    accepted: AtomicU64,
    upgraded: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    writes: AtomicU64,
    http_requests: AtomicU64,
    /// Every HTTP response written, by status; those >= 400 are the rejections.
    responses: StatusCounts,
    limits: [AtomicU64; Limit::ALL.len()],
    pings_sent: AtomicU64,
    handler_panics: [AtomicU64; HandlerKind::ALL.len()],
    /// Broadcast passes per bucket of [`PASS_BUCKETS`] (not cumulative), then `+Inf`.
    passes: [AtomicU64; PASS_BUCKETS.len() + 1],
    pass_nanos: AtomicU64,
    tls_handshakes: AtomicU64,
    tls_failures: [AtomicU64; TlsFailure::ALL.len()],
}

impl WorkerMetrics {
    /// A connection was accepted.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// A connection completed the WebSocket handshake.
    pub fn upgraded(&self) {
        self.upgraded.fetch_add(1, Relaxed);
    }

    /// A connection ended.
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }

    /// Data messages received and their payload bytes.
    pub fn message_in(&self, bytes: usize) {
        self.messages_in.fetch_add(1, Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Relaxed);
    }

    /// Data messages queued for sending.
    pub fn messages_out(&self, count: u64) {
        self.messages_out.fetch_add(count, Relaxed);
    }

    /// One write (everything queued for a connection, handed to the kernel together)
    /// of `bytes` bytes completed.
    pub fn bytes_out(&self, bytes: usize) {
        self.writes.fetch_add(1, Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Relaxed);
    }

    /// An HTTP request (not an upgrade) was answered.
    pub fn http_request(&self) {
        self.http_requests.fetch_add(1, Relaxed);
    }

    /// An HTTP response with `status` was written (the 101 of an upgrade: queued, it
    /// leaves with the session's first write). A 4xx or 5xx is also a rejection: a
    /// handshake or request refused.
    pub fn http_response(&self, status: u16) {
        self.responses.add(status);
    }

    /// A limit was reached.
    pub fn limit_hit(&self, limit: Limit) {
        self.limits[limit.index()].fetch_add(1, Relaxed);
    }

    /// A TLS handshake completed.
    pub fn tls_handshake(&self) {
        self.tls_handshakes.fetch_add(1, Relaxed);
    }

    /// A TLS handshake failed (the connection was closed after an alert).
    pub fn tls_handshake_failed(&self, reason: TlsFailure) {
        self.tls_failures[reason.index()].fetch_add(1, Relaxed);
    }

    /// A heartbeat ping was sent.
    pub fn ping_sent(&self) {
        self.pings_sent.fetch_add(1, Relaxed);
    }

    /// A handler of `kind` panicked; the panic was caught and ended only its own
    /// request or connection.
    pub fn handler_panicked(&self, kind: HandlerKind) {
        self.handler_panics[kind.index()].fetch_add(1, Relaxed);
    }

    /// A core finished writing a broadcast to every subscriber of a topic on it (one
    /// pass over a feed's followers) in `took`.
    pub fn broadcast_pass(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = PASS_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(PASS_BUCKETS.len());
        self.passes[bucket].fetch_add(1, Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.pass_nanos.fetch_add(nanos, Relaxed);
    }

    /// Connections accepted minus connections ended.
    pub fn open(&self) -> u64 {
        let closed: u64 = self.closed.iter().map(|c| c.load(Relaxed)).sum();
        self.accepted.load(Relaxed).saturating_sub(closed)
    }
}

/// Every worker's counters, for `/metrics`. As a [`Collector`] it sums them at
/// scrape time into the `ringsocket_*` families (without the prefix, which the
/// registry adds: see [`Metrics::registry`]).
#[derive(Debug, Clone)]
pub struct Metrics {
    workers: Vec<Arc<WorkerMetrics>>,
    io_backend: &'static str,
    rejections: Arc<Rejections>,
    /// Bytes of partly received messages held by all connections, the part of
    /// `max_inbound_memory` in use (the runtime's budget adds and subtracts here).
    inbound_buffered: Arc<AtomicUsize>,
    /// Bytes reserved for clients' compression windows, the part of
    /// `compression_memory_limit` in use (the runtime's budget adds and subtracts here).
    compression_memory: Arc<AtomicUsize>,
    /// Connections that negotiated permessage-deflate: [with the client keeping its
    /// context, without].
    deflate_negotiated: Arc<[AtomicU64; 2]>,
}

impl Metrics {
    /// Counters for `n` workers that do their I/O with `io_backend` (`"io_uring"` or
    /// `"epoll"`), the `io_backend` label of `ringsocket_info` and
    /// `ringsocket_build_info`.
    pub fn new(n: usize, io_backend: &'static str) -> Self {
        Self {
            workers: (0..n.max(1)).map(|_| Arc::default()).collect(),
            io_backend,
            rejections: Arc::default(),
            inbound_buffered: Arc::default(),
            compression_memory: Arc::default(),
            deflate_negotiated: Arc::default(),
        }
    }

    /// Bytes reserved for clients' compression windows now
    /// (`ringsocket_compression_memory_bytes`), shared with the runtime's budget.
    pub fn compression_memory(&self) -> &Arc<AtomicUsize> {
        &self.compression_memory
    }

    /// A connection negotiated permessage-deflate, the client keeping its context or
    /// not (`ringsocket_deflate_connections_total{client_context_takeover}`).
    pub fn deflate_negotiated(&self, client_takeover: bool) {
        self.deflate_negotiated[usize::from(!client_takeover)].fetch_add(1, Relaxed);
    }

    /// Bytes of partly received messages held by all connections now
    /// (`ringsocket_inbound_buffered_bytes`), shared with the runtime's budget.
    pub fn inbound_buffered(&self) -> &Arc<AtomicUsize> {
        &self.inbound_buffered
    }

    /// A client was refused for `reason` (`ringsocket_rejections_total{reason}`).
    pub fn rejected(&self, reason: Rejection) {
        self.rejections.add(reason);
    }

    /// The rejection counters, to count from another thread.
    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.rejections
    }

    /// Worker `i`'s counters.
    pub fn worker(&self, i: usize) -> Arc<WorkerMetrics> {
        self.workers[i % self.workers.len()].clone()
    }

    /// Open connections across all workers.
    pub fn open_connections(&self) -> u64 {
        self.workers.iter().map(|w| w.open()).sum()
    }

    /// A registry holding the process metrics (`process_*`) and, under
    /// [`PREFIX`], these counters. Register more collectors on
    /// `registry.sub_registry_with_prefix(PREFIX)` to have them prefixed too.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(process::ProcessCollector));
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(self.clone()));
        registry
    }

    /// The OpenMetrics text of [`Metrics::registry`]: the process metrics and every
    /// worker counter (not the executor's or the hub's, which `/metrics` adds).
    pub fn render(&self) -> String {
        encode(&self.registry()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding the metrics failed");
            String::new()
        })
    }

    fn sum_over(&self, f: impl Fn(&WorkerMetrics) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }

    /// Responses with a status in `range`, summed over the workers: the statuses of
    /// [`SHOWN_STATUSES`] always, any other once written.
    fn statuses(&self, range: std::ops::RangeInclusive<u16>) -> Vec<(String, u64)> {
        range
            .map(|status| {
                let n = self.sum_over(|w| &w.responses.0[StatusCounts::slot(status)]);
                (status, n)
            })
            .filter(|(status, n)| *n > 0 || SHOWN_STATUSES.contains(status))
            .map(|(status, n)| (status.to_string(), n))
            .collect()
    }
}

impl Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let e = &mut encoder;
        let sum = |f: &dyn Fn(&WorkerMetrics) -> &AtomicU64| self.sum_over(f);
        let build = [
            ("version", env!("CARGO_PKG_VERSION")),
            ("io_backend", self.io_backend),
        ];
        e.encode_descriptor(
            "build_info",
            "The version of ringsocket and the I/O backend its workers use; always 1.",
            None,
            MetricType::Gauge,
        )?
        .encode_family(&build)?
        .encode_gauge(&1u64)?;
        e.encode_descriptor(
            "info",
            "The I/O backend the workers run on (io_uring or epoll); always 1.",
            None,
            MetricType::Gauge,
        )?
        .encode_family(&[("io_backend", self.io_backend)])?
        .encode_gauge(&1u64)?;
        gauge(
            e,
            "connections_open",
            "Connections open now.",
            self.open_connections(),
        )?;
        gauge(
            e,
            "inbound_buffered_bytes",
            "Bytes of partly received WebSocket messages held by all connections now (the \
             part of max_inbound_memory in use).",
            self.inbound_buffered.load(Relaxed) as u64,
        )?;
        gauge(
            e,
            "compression_memory_bytes",
            "Bytes reserved for the compression windows of clients that keep their context \
             between messages (the part of compression_memory_limit in use).",
            self.compression_memory.load(Relaxed) as u64,
        )?;
        family(
            e,
            "deflate_connections",
            "WebSocket connections that negotiated permessage-deflate, by whether the \
             client keeps its compression context (then the server keeps its window).",
            MetricType::Counter,
            "client_context_takeover",
            ["true", "false"]
                .into_iter()
                .zip(self.deflate_negotiated.iter().map(|n| n.load(Relaxed))),
        )?;
        counter(
            e,
            "connections_accepted",
            "Connections accepted.",
            sum(&|w| &w.accepted),
        )?;
        counter(
            e,
            "websocket_upgrades",
            "Completed WebSocket handshakes.",
            sum(&|w| &w.upgraded),
        )?;
        family(
            e,
            "connections_closed",
            "Connections ended, by reason.",
            MetricType::Counter,
            "reason",
            CloseReason::ALL
                .iter()
                .map(|r| (r.label(), sum(&|w| &w.closed[r.index()]))),
        )?;
        counter(
            e,
            "messages_in",
            "WebSocket data messages received.",
            sum(&|w| &w.messages_in),
        )?;
        counter(
            e,
            "messages_out",
            "WebSocket data messages sent.",
            sum(&|w| &w.messages_out),
        )?;
        counter(
            e,
            "bytes_in",
            "WebSocket payload bytes received.",
            sum(&|w| &w.bytes_in),
        )?;
        counter(
            e,
            "bytes_out",
            "Bytes written to sockets.",
            sum(&|w| &w.bytes_out),
        )?;
        counter(
            e,
            "writes",
            "Writes handed to the kernel, each carrying everything queued for one connection \
             (messages_out_total / writes_total: messages per write).",
            sum(&|w| &w.writes),
        )?;
        counter(
            e,
            "http_requests",
            "Plain HTTP requests answered.",
            sum(&|w| &w.http_requests),
        )?;
        let mut responses = self.statuses(FIRST_STATUS..=599);
        let other = sum(&|w| &w.responses.0[STATUS_SLOTS]);
        if other > 0 {
            responses.push(("other".into(), other));
        }
        family(
            e,
            "http_responses",
            "HTTP responses written, by status (the 101 of every WebSocket upgrade too).",
            MetricType::Counter,
            "status",
            responses,
        )?;
        {
            // One family, two views: every response with a 4xx or 5xx status by
            // `status`, and every client refused by an access rule or abuse limit by
            // `reason` (a refused handshake is in both: sum one label, not both).
            let mut metric = e.encode_descriptor(
                "rejections",
                "Refusals: responses with a 4xx or 5xx status, by status; clients refused \
                 by an access rule or an abuse limit (an HTTP refusal or a close), by reason.",
                None,
                MetricType::Counter,
            )?;
            for (status, n) in self.statuses(400..=599) {
                metric
                    .encode_family(&[("status", status)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
            for reason in Rejection::ALL {
                metric
                    .encode_family(&[("reason", reason.label())])?
                    .encode_counter::<NoLabelSet, _, u64>(&self.rejections.get(reason), None)?;
            }
        }
        counter(
            e,
            "pings_sent",
            "Heartbeat pings sent.",
            sum(&|w| &w.pings_sent),
        )?;
        family(
            e,
            "limit_hits",
            "Times a limit was reached, by limit.",
            MetricType::Counter,
            "limit",
            Limit::ALL
                .iter()
                .map(|l| (l.label(), sum(&|w| &w.limits[l.index()]))),
        )?;
        family(
            e,
            "handler_panics",
            "Handler panics caught (each ended only its own request or connection), by kind.",
            MetricType::Counter,
            "kind",
            HandlerKind::ALL
                .iter()
                .map(|k| (k.label(), sum(&|w| &w.handler_panics[k.index()]))),
        )?;
        counter(
            e,
            "tls_handshakes",
            "TLS handshakes completed.",
            sum(&|w| &w.tls_handshakes),
        )?;
        family(
            e,
            "tls_handshake_failures",
            "TLS handshakes that failed (the connection was closed, after an alert where \
             TLS allows one), by reason: not_tls (plain HTTP or garbage on the TLS port), \
             protocol, incompatible (no common version, suite or group), alpn, \
             alert_received (the client refused us, e.g. an unknown CA), timeout, eof, io, \
             other.",
            MetricType::Counter,
            "reason",
            TlsFailure::ALL
                .iter()
                .map(|r| (r.label(), sum(&|w| &w.tls_failures[r.index()]))),
        )?;
        let mut buckets: Vec<(f64, u64)> = PASS_BUCKETS
            .iter()
            .enumerate()
            .map(|(i, le)| (*le, sum(&|w| &w.passes[i])))
            .collect();
        buckets.push((f64::INFINITY, sum(&|w| &w.passes[PASS_BUCKETS.len()])));
        histogram(
            e,
            "broadcast_pass",
            "Time a core took to write what was broadcast to a topic to every subscriber \
             of it on that core (one pass; subscribers of one topic only). A message \
             published while a pass is under way reaches the subscribers already written \
             in the next one, so this is how long a subscriber can wait when the core is \
             busy.",
            &Unit::Seconds,
            &buckets,
            sum(&|w| &w.pass_nanos) as f64 / 1e9,
        )
    }
}

/// Encodes a counter without labels: `name` without `_total`, which the encoder adds.
pub(crate) fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// Encodes a gauge without labels.
pub(crate) fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// Encodes a counter or gauge family with one label, `key`: a sample per row.
pub(crate) fn family<V: EncodeLabelValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    key: &str,
    rows: impl IntoIterator<Item = (V, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (value, n) in rows {
        let labels = [(key, value)];
        let mut sample = metric.encode_family(&labels)?;
        if metric_type == MetricType::Counter {
            sample.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        } else {
            sample.encode_gauge(&n)?;
        }
    }
    Ok(())
}

/// Encodes a histogram named `name` + `_` + `unit`: `buckets` are (upper bound, count
/// in that bucket alone), the last bound `f64::INFINITY`; the encoder makes them
/// cumulative.
pub(crate) fn histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: &Unit,
    buckets: &[(f64, u64)],
    sum: f64,
) -> fmt::Result {
    let count = buckets.iter().map(|(_, n)| n).sum();
    encoder
        .encode_descriptor(name, help, Some(unit), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, buckets, None)
}

/// The text of one collector under [`PREFIX`], for tests.
#[cfg(test)]
pub(crate) fn render_collector(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix(PREFIX)
        .register_collector(Box::new(collector));
    encode(&registry).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_line(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }

    /// Passes land in the first bucket at or above their time; buckets are cumulative,
    /// summed over the workers, and the sum is in seconds.
    #[test]
    fn broadcast_passes_render_as_a_cumulative_histogram() {
        let metrics = Metrics::new(2, "io_uring");
        metrics.worker(0).broadcast_pass(Duration::from_micros(300));
        metrics.worker(1).broadcast_pass(Duration::from_millis(40));
        metrics.worker(1).broadcast_pass(Duration::from_millis(50));
        metrics.worker(0).broadcast_pass(Duration::from_secs(3));
        let text = render_collector(metrics);
        for line in [
            "# TYPE ringsocket_broadcast_pass_seconds histogram",
            "# UNIT ringsocket_broadcast_pass_seconds seconds",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.0005\"} 1",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.025\"} 1",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.05\"} 3",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"2.5\"} 3",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"+Inf\"} 4",
            "ringsocket_broadcast_pass_seconds_sum 3.0903",
            "ringsocket_broadcast_pass_seconds_count 4",
        ] {
            has_line(&text, line);
        }
    }

    /// Counters are the sum over the workers, with the `_total` suffix; the build info
    /// names the version and the backend given at construction.
    #[test]
    fn counters_are_summed_over_the_workers() {
        let metrics = Metrics::new(2, "io_uring");
        let (a, b) = (metrics.worker(0), metrics.worker(1));
        for _ in 0..3 {
            a.accepted();
        }
        b.accepted();
        a.closed(CloseReason::Normal);
        a.closed(CloseReason::PeerGone);
        b.closed(CloseReason::Normal);
        a.message_in(10);
        b.message_in(5);
        b.limit_hit(Limit::BodySize);
        metrics.inbound_buffered().fetch_add(70_000, Relaxed);
        let text = render_collector(metrics);
        for line in [
            &format!(
                "ringsocket_build_info{{version=\"{}\",io_backend=\"io_uring\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "# TYPE ringsocket_build_info gauge",
            "ringsocket_info{io_backend=\"io_uring\"} 1",
            "# TYPE ringsocket_info gauge",
            "ringsocket_connections_open 1",
            "# TYPE ringsocket_connections_open gauge",
            "ringsocket_connections_accepted_total 4",
            "# TYPE ringsocket_connections_accepted counter",
            "ringsocket_connections_closed_total{reason=\"normal\"} 2",
            "ringsocket_connections_closed_total{reason=\"peer_gone\"} 1",
            "ringsocket_connections_closed_total{reason=\"shutdown\"} 0",
            "ringsocket_messages_in_total 2",
            "ringsocket_bytes_in_total 15",
            "ringsocket_limit_hits_total{limit=\"max_body_bytes\"} 1",
            "ringsocket_limit_hits_total{limit=\"max_connections\"} 0",
            "ringsocket_limit_hits_total{limit=\"max_inbound_memory\"} 0",
            "ringsocket_inbound_buffered_bytes 70000",
            "# TYPE ringsocket_inbound_buffered_bytes gauge",
        ] {
            has_line(&text, line);
        }
    }

    /// Every response counts in `http_responses_total`; only 4xx and 5xx count as
    /// rejections, and statuses outside the always-shown list appear once written.
    #[test]
    fn responses_and_rejections_are_counted_apart() {
        let metrics = Metrics::new(2, "io_uring");
        let (a, b) = (metrics.worker(0), metrics.worker(1));
        a.http_response(200);
        b.http_response(200);
        a.http_response(202);
        a.http_response(101);
        b.http_response(404);
        a.http_response(418);
        b.http_response(999);
        let text = render_collector(metrics);
        for line in [
            "ringsocket_http_responses_total{status=\"101\"} 1",
            "ringsocket_http_responses_total{status=\"200\"} 2",
            "ringsocket_http_responses_total{status=\"202\"} 1",
            "ringsocket_http_responses_total{status=\"404\"} 1",
            "ringsocket_http_responses_total{status=\"418\"} 1",
            "ringsocket_http_responses_total{status=\"503\"} 0",
            "ringsocket_http_responses_total{status=\"other\"} 1",
            "ringsocket_rejections_total{status=\"404\"} 1",
            "ringsocket_rejections_total{status=\"418\"} 1",
            "ringsocket_rejections_total{status=\"403\"} 0",
        ] {
            has_line(&text, line);
        }
        assert!(
            !text.contains("ringsocket_rejections_total{status=\"2"),
            "a success counted as a rejection:\n{text}"
        );
        assert!(
            !text.contains("ringsocket_http_responses_total{status=\"301\"}"),
            "a status never written and not in the list is shown:\n{text}"
        );
    }

    #[test]
    fn handler_panics_are_counted_by_kind() {
        let metrics = Metrics::new(1, "io_uring");
        metrics.worker(0).handler_panicked(HandlerKind::Http);
        metrics.worker(0).handler_panicked(HandlerKind::Http);
        metrics.worker(0).handler_panicked(HandlerKind::WebSocket);
        let text = render_collector(metrics);
        has_line(&text, "ringsocket_handler_panics_total{kind=\"http\"} 2");
        has_line(
            &text,
            "ringsocket_handler_panics_total{kind=\"websocket\"} 1",
        );
    }

    /// The whole exposition: process metrics without the prefix, ours with it, and the
    /// OpenMetrics end marker.
    #[test]
    fn the_registry_has_process_and_worker_metrics_and_ends_with_eof() {
        let metrics = Metrics::new(1, "io_uring");
        metrics.worker(0).accepted();
        let text = metrics.render();
        has_line(&text, "ringsocket_connections_accepted_total 1");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }
}
