//! Counters in Prometheus text format.
//!
//! Each worker owns one [`WorkerMetrics`] and is its only writer (relaxed atomic adds on
//! memory no other core writes, so the message path shares no cache line); `/metrics`
//! sums every worker's counters when it is scraped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Appends one metric family in the Prometheus text format: `ringsocket_{name}`, its
/// help and type lines, then one sample per row (`labels` is `""` or `{k="v",…}`).
pub fn write_family(out: &mut String, name: &str, help: &str, kind: &str, rows: &[(String, u64)]) {
    write_header(out, name, help, kind);
    for (labels, value) in rows {
        let _ = writeln!(out, "ringsocket_{name}{labels} {value}");
    }
}

/// Appends a metric family's help and type lines (`ringsocket_{name}`).
fn write_header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(
        out,
        "# HELP ringsocket_{name} {help}\n# TYPE ringsocket_{name} {kind}"
    );
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
    /// The handshake or request was refused with an HTTP error status.
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
}

impl Limit {
    const ALL: [Limit; 5] = [
        Self::MaxConnections,
        Self::MessageSize,
        Self::OutboundBytes,
        Self::BodySize,
        Self::HeadSize,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MessageSize => "max_message_size",
            Self::OutboundBytes => "max_outbound_bytes",
            Self::BodySize => "max_body_bytes",
            Self::HeadSize => "max_head_bytes",
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

/// Statuses counted for refused handshakes and HTTP responses.
const STATUSES: [u16; 12] = [200, 202, 400, 403, 404, 405, 411, 413, 426, 431, 500, 503];

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
    rejections: [AtomicU64; STATUSES.len() + 1],
    limits: [AtomicU64; Limit::ALL.len()],
    pings_sent: AtomicU64,
    /// Broadcast passes per bucket of [`PASS_BUCKETS`] (not cumulative), then `+Inf`.
    passes: [AtomicU64; PASS_BUCKETS.len() + 1],
    pass_nanos: AtomicU64,
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

    /// A handshake or request was refused with `status`.
    pub fn rejected(&self, status: u16) {
        let i = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.rejections[i].fetch_add(1, Relaxed);
    }

    /// A limit was reached.
    pub fn limit_hit(&self, limit: Limit) {
        self.limits[limit.index()].fetch_add(1, Relaxed);
    }

    /// A heartbeat ping was sent.
    pub fn ping_sent(&self) {
        self.pings_sent.fetch_add(1, Relaxed);
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

/// Every worker's counters, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    workers: Vec<Arc<WorkerMetrics>>,
}

impl Metrics {
    /// Counters for `n` workers.
    pub fn new(n: usize) -> Self {
        Self {
            workers: (0..n).map(|_| Arc::default()).collect(),
        }
    }

    /// Worker `i`'s counters.
    pub fn worker(&self, i: usize) -> Arc<WorkerMetrics> {
        self.workers[i % self.workers.len()].clone()
    }

    /// Open connections across all workers.
    pub fn open_connections(&self) -> u64 {
        self.workers.iter().map(|w| w.open()).sum()
    }

    /// The Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        let sum = |f: &dyn Fn(&WorkerMetrics) -> &AtomicU64| -> u64 { self.sum_over(f) };
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, kind: &str, rows: &[(String, u64)]| {
            write_family(&mut out, name, help, kind, rows);
        };
        counter(
            "connections_open",
            "Connections open now.",
            "gauge",
            &[(String::new(), self.open_connections())],
        );
        counter(
            "connections_accepted_total",
            "Connections accepted.",
            "counter",
            &[(String::new(), sum(&|w| &w.accepted))],
        );
        counter(
            "websocket_upgrades_total",
            "Completed WebSocket handshakes.",
            "counter",
            &[(String::new(), sum(&|w| &w.upgraded))],
        );
        let closed: Vec<_> = CloseReason::ALL
            .iter()
            .map(|r| {
                (
                    format!("{{reason=\"{}\"}}", r.label()),
                    sum(&|w| &w.closed[r.index()]),
                )
            })
            .collect();
        counter(
            "connections_closed_total",
            "Connections ended, by reason.",
            "counter",
            &closed,
        );
        counter(
            "messages_in_total",
            "WebSocket data messages received.",
            "counter",
            &[(String::new(), sum(&|w| &w.messages_in))],
        );
        counter(
            "messages_out_total",
            "WebSocket data messages sent.",
            "counter",
            &[(String::new(), sum(&|w| &w.messages_out))],
        );
        counter(
            "bytes_in_total",
            "WebSocket payload bytes received.",
            "counter",
            &[(String::new(), sum(&|w| &w.bytes_in))],
        );
        counter(
            "bytes_out_total",
            "Bytes written to sockets.",
            "counter",
            &[(String::new(), sum(&|w| &w.bytes_out))],
        );
        counter(
            "writes_total",
            "Writes handed to the kernel, each carrying everything queued for one connection \
             (messages_out_total / writes_total: messages per write).",
            "counter",
            &[(String::new(), sum(&|w| &w.writes))],
        );
        counter(
            "http_requests_total",
            "Plain HTTP requests answered.",
            "counter",
            &[(String::new(), sum(&|w| &w.http_requests))],
        );
        counter(
            "pings_sent_total",
            "Heartbeat pings sent.",
            "counter",
            &[(String::new(), sum(&|w| &w.pings_sent))],
        );
        let mut rejections: Vec<_> = STATUSES
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("{{status=\"{s}\"}}"), sum(&|w| &w.rejections[i])))
            .collect();
        rejections.push((
            "{status=\"other\"}".into(),
            sum(&|w| &w.rejections[STATUSES.len()]),
        ));
        counter(
            "rejections_total",
            "Handshakes and requests refused, by HTTP status.",
            "counter",
            &rejections,
        );
        let limits: Vec<_> = Limit::ALL
            .iter()
            .map(|l| {
                (
                    format!("{{limit=\"{}\"}}", l.label()),
                    sum(&|w| &w.limits[l.index()]),
                )
            })
            .collect();
        counter(
            "limit_hits_total",
            "Times a limit was reached, by limit.",
            "counter",
            &limits,
        );
        self.render_passes(&mut out);
        out
    }

    /// The `broadcast_pass_seconds` histogram, summed over the workers.
    fn render_passes(&self, out: &mut String) {
        write_header(
            out,
            "broadcast_pass_seconds",
            "Time a core took to write what was broadcast to a topic to every subscriber \
             of it on that core (one pass; subscribers of one topic only). A message \
             published while a pass is under way reaches the subscribers already written \
             in the next one, so this is how long a subscriber can wait when the core is \
             busy.",
            "histogram",
        );
        let mut cumulative = 0;
        for (i, le) in PASS_BUCKETS.iter().enumerate() {
            cumulative += self.sum_over(|w| &w.passes[i]);
            let _ = writeln!(
                out,
                "ringsocket_broadcast_pass_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.sum_over(|w| &w.passes[PASS_BUCKETS.len()]);
        let nanos = self.sum_over(|w| &w.pass_nanos);
        let _ = writeln!(
            out,
            "ringsocket_broadcast_pass_seconds_bucket{{le=\"+Inf\"}} {cumulative}\n\
             ringsocket_broadcast_pass_seconds_sum {}\n\
             ringsocket_broadcast_pass_seconds_count {cumulative}",
            nanos as f64 / 1e9
        );
    }

    fn sum_over(&self, f: impl Fn(&WorkerMetrics) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| f(w).load(Relaxed)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes land in the first bucket at or above their time; buckets are cumulative,
    /// summed over the workers, and the sum is in seconds.
    #[test]
    fn broadcast_passes_render_as_a_cumulative_histogram() {
        let metrics = Metrics::new(2);
        metrics.worker(0).broadcast_pass(Duration::from_micros(300));
        metrics.worker(1).broadcast_pass(Duration::from_millis(40));
        metrics.worker(1).broadcast_pass(Duration::from_millis(50));
        metrics.worker(0).broadcast_pass(Duration::from_secs(3));
        let text = metrics.render();
        for line in [
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.0005\"} 1",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.025\"} 1",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"0.05\"} 3",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"2.5\"} 3",
            "ringsocket_broadcast_pass_seconds_bucket{le=\"+Inf\"} 4",
            "ringsocket_broadcast_pass_seconds_sum 3.0903",
            "ringsocket_broadcast_pass_seconds_count 4",
            "# TYPE ringsocket_broadcast_pass_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
