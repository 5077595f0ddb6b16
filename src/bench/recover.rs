//! `bench recover`: many `ringsocket.v1` clients reconnect at once and each recovers
//! the publications it missed (docs/protocol.md, "Recovery, step by step").
//!
//! Each round:
//!
//! 1. `--clients` clients connect to `/v1` (offering `Sec-WebSocket-Protocol:
//!    ringsocket.v1`) and subscribe to `--topic`; the round waits for every
//!    `subscribed`.
//! 2. One message is published (`POST /publish/{topic}`) and the round waits until
//!    every client has it: the **baseline**, the offset each client will recover from.
//! 3. Every client closes **cleanly**: a Close 1000, then the server's Close, so that
//!    the server has dropped every subscription before the misses (an abrupt close
//!    would leave the server still tearing connections down during the wave).
//! 4. `--missed` messages are published, one `POST` at a time, each answered 202; the
//!    round waits until `GET /history/{topic}` shows the offset advanced by `--missed`.
//! 5. **The reconnect wave**: every client's connect is issued at once (no cap on
//!    concurrent handshakes) and each subscribes with `since: {offset, epoch}` of the
//!    baseline. Per client, the time from the wave's start until it has `subscribed`
//!    with `recovered: true` and every missed publication, in offset order, with no
//!    gap and no duplicate, each carrying the message published for that offset.
//! 6. One live message is published; every client must get it next (no duplicate of a
//!    recovered one, no gap), then all close.
//!
//! Any deviation (a refused or failed connection, `recovered: false`, another epoch, a
//! gap, a duplicate, a publication with the wrong content, a timeout) fails that client
//! for the round and is counted by cause; the run fails unless every client of every
//! round recovered exactly. The report gives per round the time until all are live
//! again (the slowest client), the per-client distribution, the wave's duration (until
//! the last handshake completed), and, given `--server-pid`, the server's CPU time
//! (user + system from `/proc/PID/stat`) from the wave's start until the last client
//! recovered, in all and per recovered message; then the medians over the rounds.
//!
//! Threads as in the other scenarios: `--threads N` OS threads, each with a
//! single-threaded tokio runtime and every N-th client; the calling thread publishes
//! over plain HTTP/1.1 (keep-alive) and drives the rounds. Plain `ws://` only: the
//! publisher speaks no TLS.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream as StdTcpStream};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::mpsc as tokio_mpsc;
use tokio::task::LocalSet;

use super::client::{self, BenchStream, Client, OpenError};
use super::common::CommonOptions;
use super::compare::{Figure, Summary};
use super::stats::{self, CpuPerItem, CpuSample, CpuUsage, LatencySummary, Percentile, thousands};
use super::target::Target;
use super::{BenchError, Progress, join_worker, new_runtime};
use crate::proto::{ClientRequest, Event, HandshakeLimits, deflate};

/// The subprotocol the clients offer and the server must choose.
pub const PROTOCOL: &str = "ringsocket.v1";

/// The topic `bench recover` publishes to unless `--topic` says otherwise.
pub const DEFAULT_TOPIC: &str = "bench-recover";

/// Options of `bench recover`; the defaults are those of the command line.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct RecoverOptions {
    /// The server's base URL, ws://host:port. The clients connect to /v1 on it (a
    /// query such as ?token=JWT is kept); messages are published with POST
    /// /publish/{topic} and the offset read from GET /history/{topic} on the same host
    /// and port. Run the server with a history that holds --missed with margin
    /// (--set history_size=1000).
    #[arg(long)]
    pub url: String,
    /// Clients that subscribe, disconnect and reconnect at once.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages published while the clients are away, which each must recover.
    #[arg(long, default_value_t = 100)]
    pub missed: u64,
    /// The topic.
    #[arg(long, default_value = DEFAULT_TOPIC)]
    pub topic: String,
    /// Bytes of each published JSON message (the body of each POST, the `data` of
    /// each publication): {"round":R,"seq":S,"pad":"xx…"}.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Rounds; the report gives each and their medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// The bearer token of POST /publish and GET /history (the server's
    /// publish_token); none is needed on a loopback bind without one.
    #[arg(long, value_name = "TOKEN")]
    pub publish_token: Option<String>,
    /// Threads, source addresses, timeout (per client and step), server pid.
    #[command(flatten)]
    pub common: CommonOptions,
}

impl RecoverOptions {
    /// The command line's defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            clients: 1000,
            missed: 100,
            topic: DEFAULT_TOPIC.to_owned(),
            size: 100,
            rounds: 3,
            publish_token: None,
            common: CommonOptions::default(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        self.common.validate()?;
        if self.clients == 0 || self.missed == 0 || self.rounds == 0 {
            return Err(BenchError::Options(
                "--clients, --missed and --rounds must be at least 1".into(),
            ));
        }
        if self.common.tls || self.common.ca.is_some() || self.common.insecure {
            return Err(BenchError::Options(
                "bench recover speaks plain ws:// and HTTP only (no --tls, --ca, --insecure)"
                    .into(),
            ));
        }
        if self.topic.is_empty()
            || !self
                .topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(BenchError::Options(format!(
                "--topic {:?}: use letters, digits and - _ . : (it goes into the URL path)",
                self.topic
            )));
        }
        let least = message(self.rounds, self.missed + 1, 0).len();
        if self.size < least {
            return Err(BenchError::Options(format!(
                "--size {}: the messages of this run need at least {least} bytes",
                self.size
            )));
        }
        Ok(())
    }
}

/// What `bench recover` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoverReport {
    /// The base URL.
    pub url: String,
    /// Where the clients connected: the base URL's `/v1`.
    pub v1_url: String,
    /// The topic.
    pub topic: String,
    /// Clients per round.
    pub clients: usize,
    /// Publications missed and recovered per client and round.
    pub missed: u64,
    /// Bytes of each published message.
    pub size: usize,
    /// Load generator threads.
    pub threads: usize,
    /// Whether the clients offered permessage-deflate (--deflate) and had it accepted.
    pub deflate: bool,
    /// How the clients left before the misses: `clean` (Close 1000, the server's Close
    /// awaited).
    pub close: &'static str,
    /// Every round.
    pub rounds: Vec<RoundReport>,
    /// The medians over the rounds.
    pub median: Medians,
    /// Whether every client of every round recovered exactly.
    pub exact: bool,
    /// Time from the wave's start until recovered, every client of every round, for
    /// plots.
    pub recovery_curve: Vec<Percentile>,
}

/// One round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundReport {
    /// 1, 2, …
    pub round: u32,
    /// The topic's epoch.
    pub epoch: String,
    /// The offset of the baseline publication, the one the clients recovered from.
    pub baseline_offset: u64,
    /// Clients that subscribed at the start of the round.
    pub subscribed: u64,
    /// Clients that recovered every missed publication, in order, with no gap and no
    /// duplicate, with `recovered: true`, and then got the live one.
    pub recovered_exactly: u64,
    /// Clients that failed somewhere in the round, by cause.
    pub failures: BTreeMap<String, u64>,
    /// The first failure in full (offsets and all), if any.
    pub first_failure: Option<String>,
    /// Clients whose `subscribed` said fewer `missed` than were published: the rest
    /// reached them as live publications (the server's core had not delivered them
    /// yet). Not a failure when every one came, in order.
    pub partly_live: u64,
    /// Publishing the missed messages until the history showed them, in seconds.
    pub publish_secs: f64,
    /// From the wave's start until the last client's handshake completed, in seconds.
    pub wave_secs: f64,
    /// From the wave's start until the last client recovered: all live again, in
    /// seconds.
    pub all_live_secs: f64,
    /// Per client, from the wave's start until its handshake completed.
    pub handshake_us: LatencySummary,
    /// Per client, from the wave's start until it had every missed publication.
    pub recovery_us: LatencySummary,
    /// From the live message's POST until every client had it, in seconds.
    pub live_secs: f64,
    /// CPU over the wave (its start until the last client recovered).
    pub cpu: CpuUsage,
    /// That CPU time per recovered message (`recovered clients × missed`).
    pub cpu_per_message: CpuPerItem,
    /// The server's CPU time over the wave from `/proc/PID/task/*/schedstat`, in
    /// seconds: exact to the nanosecond, where `/proc/PID/stat` (`cpu`) counts clock
    /// ticks (10 ms at 100 Hz), which a wave of a few hundred milliseconds feels.
    pub server_schedstat_secs: Option<f64>,
    /// That time per recovered message, in microseconds.
    pub server_schedstat_per_message_us: Option<f64>,
    /// Closing handshakes that did not complete (not a failure of recovery).
    pub close_failures: u64,
}

/// The medians over the rounds (the mean of the middle two for an even count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Medians {
    /// All live again: the slowest client, in milliseconds.
    pub all_live_ms: f64,
    /// Per-client recovery time, median, in milliseconds.
    pub recovery_p50_ms: f64,
    /// Per-client recovery time, 99th percentile, in milliseconds.
    pub recovery_p99_ms: f64,
    /// The wave, until the last handshake completed, in milliseconds.
    pub wave_ms: f64,
    /// The live message, from its POST until every client had it, in milliseconds.
    pub live_ms: f64,
    /// The server's CPU time over the wave, in milliseconds, given its pid.
    pub server_cpu_ms: Option<f64>,
    /// The server's CPU per recovered message, in microseconds, given its pid.
    pub server_cpu_per_message_us: Option<f64>,
    /// The load generator's CPU time over the wave, in milliseconds.
    pub client_cpu_ms: Option<f64>,
    /// The server's CPU time over the wave from schedstat, in milliseconds.
    pub server_schedstat_ms: Option<f64>,
    /// That per recovered message, in microseconds.
    pub server_schedstat_per_message_us: Option<f64>,
}

impl Medians {
    fn of(rounds: &[RoundReport]) -> Self {
        let m =
            |f: &dyn Fn(&RoundReport) -> f64| median(rounds.iter().map(f).collect()).unwrap_or(0.0);
        let opt = |f: &dyn Fn(&RoundReport) -> Option<f64>| {
            let values: Option<Vec<f64>> = rounds.iter().map(f).collect();
            values.and_then(median)
        };
        Self {
            all_live_ms: m(&|r| r.all_live_secs * 1e3),
            recovery_p50_ms: m(&|r| r.recovery_us.p50 / 1e3),
            recovery_p99_ms: m(&|r| r.recovery_us.p99 / 1e3),
            wave_ms: m(&|r| r.wave_secs * 1e3),
            live_ms: m(&|r| r.live_secs * 1e3),
            server_cpu_ms: opt(&|r| r.cpu.server_secs.map(|s| s * 1e3)),
            server_cpu_per_message_us: opt(&|r| r.cpu_per_message.server_us),
            client_cpu_ms: opt(&|r| r.cpu.client_secs.map(|s| s * 1e3)),
            server_schedstat_ms: opt(&|r| r.server_schedstat_secs.map(|s| s * 1e3)),
            server_schedstat_per_message_us: opt(&|r| r.server_schedstat_per_message_us),
        }
    }
}

/// The median of `values`; `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

impl RecoverReport {
    /// Clients that did not recover exactly, over every round.
    pub fn not_exact(&self) -> u64 {
        self.rounds
            .iter()
            .map(|r| self.clients as u64 - r.recovered_exactly)
            .sum()
    }
}

impl Summary for RecoverReport {
    const MODE: &'static str = "recover";
    const LATENCY: &'static str = "reconnect-to-recovered";

    fn url(&self) -> &str {
        &self.url
    }

    fn figures(&self) -> Vec<Figure> {
        let m = &self.median;
        vec![
            Figure::less("all live again ms", m.all_live_ms),
            Figure::less("recovery p50 ms", m.recovery_p50_ms),
            Figure::less("recovery p99 ms", m.recovery_p99_ms),
            Figure::less("reconnect wave ms", m.wave_ms),
            Figure::less("server CPU ms", m.server_cpu_ms),
            Figure::less("server CPU µs/message", m.server_cpu_per_message_us),
            Figure::less("not recovered exactly", self.not_exact() as f64),
        ]
    }

    fn latency_curve(&self) -> &[Percentile] {
        &self.recovery_curve
    }

    fn failure(&self) -> Option<String> {
        (!self.exact).then(|| {
            let mut causes = BTreeMap::new();
            for round in &self.rounds {
                stats::merge_counts(&mut causes, round.failures.clone());
            }
            let causes: Vec<String> = causes.iter().map(|(c, n)| format!("{n} × {c}")).collect();
            format!(
                "{} of {} client rounds did not recover exactly: {}",
                self.not_exact(),
                self.clients as u64 * self.rounds.len() as u64,
                causes.join("; ")
            )
        })
    }
}

fn ms(secs: f64) -> String {
    format!("{:.1} ms", secs * 1e3)
}

fn opt_ms(secs: Option<f64>) -> String {
    secs.map_or_else(|| "n/a".to_owned(), ms)
}

fn opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "n/a".to_owned(), |us| format!("{us:.2} µs"))
}

impl fmt::Display for RecoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench recover {} (clients on {}, topic {}){}",
            self.url,
            self.v1_url,
            self.topic,
            stats::transport(false, self.deflate)
        )?;
        writeln!(
            f,
            "  {} clients × {} missed publications of {} B, {} round(s), {} thread(s); \
             closed cleanly before the misses, reconnected all at once",
            thousands(self.clients as u64),
            thousands(self.missed),
            self.size,
            self.rounds.len(),
            self.threads
        )?;
        writeln!(
            f,
            "  round  all live     p50          p99          wave         live         \
             server CPU   per message  exact"
        )?;
        for r in &self.rounds {
            writeln!(
                f,
                "  {:<6} {:<12} {:<12} {:<12} {:<12} {:<12} {:<12} {:<12} {}/{}",
                r.round,
                ms(r.all_live_secs),
                ms(r.recovery_us.p50 / 1e6),
                ms(r.recovery_us.p99 / 1e6),
                ms(r.wave_secs),
                ms(r.live_secs),
                opt_ms(r.cpu.server_secs),
                opt_us(r.cpu_per_message.server_us),
                thousands(r.recovered_exactly),
                thousands(self.clients as u64)
            )?;
        }
        let m = &self.median;
        writeln!(
            f,
            "  median {:<12} {:<12} {:<12} {:<12} {:<12} {:<12} {:<12}",
            ms(m.all_live_ms / 1e3),
            ms(m.recovery_p50_ms / 1e3),
            ms(m.recovery_p99_ms / 1e3),
            ms(m.wave_ms / 1e3),
            ms(m.live_ms / 1e3),
            opt_ms(m.server_cpu_ms.map(|v| v / 1e3)),
            opt_us(m.server_cpu_per_message_us)
        )?;
        for r in &self.rounds {
            writeln!(f, "  cpu {}  {} over the wave", r.round, r.cpu)?;
            if let Some(secs) = r.server_schedstat_secs {
                writeln!(
                    f,
                    "         server {} by schedstat (exact), {} per recovered message",
                    ms(secs),
                    opt_us(r.server_schedstat_per_message_us)
                )?;
            }
        }
        if let (Some(total), Some(per)) = (m.server_schedstat_ms, m.server_schedstat_per_message_us)
        {
            writeln!(
                f,
                "  median server CPU by schedstat: {total:.1} ms, {per:.2} µs per recovered message"
            )?;
        }
        let partly: u64 = self.rounds.iter().map(|r| r.partly_live).sum();
        if partly > 0 {
            writeln!(
                f,
                "  {} client rounds were told fewer `missed` than published; the rest came live, in order",
                thousands(partly)
            )?;
        }
        let closes: u64 = self.rounds.iter().map(|r| r.close_failures).sum();
        if closes > 0 {
            writeln!(
                f,
                "  {closes} closing handshakes did not complete (not counted against recovery)"
            )?;
        }
        if self.exact {
            write!(
                f,
                "  recovered exactly: every client of every round (recovered: true, every \
                 missed publication in order, no gap, no duplicate, then the live one)"
            )
        } else {
            write!(
                f,
                "  NOT recovered exactly: {} client rounds",
                thousands(self.not_exact())
            )?;
            for r in &self.rounds {
                for (cause, n) in &r.failures {
                    write!(f, "\n    round {}: {} × {cause}", r.round, thousands(*n))?;
                }
                if let Some(first) = &r.first_failure {
                    write!(f, "\n    round {}: first: {first}", r.round)?;
                }
            }
            Ok(())
        }
    }
}

/// The JSON of the message with sequence number `seq` in `round`, padded to `size`
/// bytes (longer when `size` is too small for it).
fn message(round: u32, seq: u64, size: usize) -> String {
    let head = format!(r#"{{"round":{round},"seq":{seq},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut text = String::with_capacity(head.len() + pad + 2);
    text.push_str(&head);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

/// The `/v1` URL on the same server as the base URL `url`: its path must be empty,
/// `/` or `/v1`; a query is kept.
fn v1_url(url: &str) -> Result<String, BenchError> {
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[scheme_end..];
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (path, query) = match tail.find('?') {
        Some(i) => tail.split_at(i),
        None => (tail, ""),
    };
    if !matches!(path, "" | "/" | "/v1") {
        return Err(BenchError::Url(format!(
            "{url}: give the server's base URL, ws://host:port (bench recover uses /v1, \
             /publish/{{topic}} and /history/{{topic}} on it)"
        )));
    }
    Ok(format!("{}{authority}/v1{query}", &url[..scheme_end]))
}

/// A frame from the server, with the fields recovery looks at.
#[derive(Debug, Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    offset: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    recovered: Option<bool>,
    missed: Option<u64>,
    data: Option<Data>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

/// A publication's `data`, as [`message`] wrote it.
#[derive(Debug, Deserialize)]
struct Data {
    round: u32,
    seq: u64,
}

/// Why a client did not recover exactly: a cause to count, and the details.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    cause: String,
    detail: String,
}

fn violation(cause: impl Into<String>, detail: impl Into<String>) -> Violation {
    Violation {
        cause: cause.into(),
        detail: detail.into(),
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.cause, self.detail)
    }
}

/// A client's place in the topic: the epoch and the last offset it handled, and the
/// offset of the round's baseline publication (`seq` 0) once it had it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Position {
    epoch: String,
    last: u64,
    base: Option<u64>,
}

fn parse(text: &str) -> Result<Frame<'_>, Violation> {
    serde_json::from_str(text)
        .map_err(|e| violation("a frame that is not ringsocket.v1", format!("{e}: {text}")))
}

/// Checks a frame that must answer `subscribe` (`id`) to `topic`, with `since` when
/// resubscribing; returns the position it starts from and the `missed` it announced.
fn check_subscribed(
    text: &str,
    id: u64,
    topic: &str,
    since: Option<&Position>,
) -> Result<(Position, u64), Violation> {
    let frame = parse(text)?;
    match &*frame.kind {
        "subscribed" => {}
        "error" => {
            return Err(violation(
                format!(
                    "subscribe refused: {}",
                    frame.code.as_deref().unwrap_or("?")
                ),
                frame.message.as_deref().unwrap_or_default().to_owned(),
            ));
        }
        other => {
            return Err(violation(
                format!("a {other:?} frame before subscribed"),
                text.to_owned(),
            ));
        }
    }
    if frame.id != Some(id) || frame.topic.as_deref() != Some(topic) {
        return Err(violation(
            "subscribed with another id or topic",
            text.to_owned(),
        ));
    }
    let (Some(offset), Some(epoch)) = (frame.offset, frame.epoch) else {
        return Err(violation(
            "subscribed without offset or epoch",
            text.to_owned(),
        ));
    };
    let missed = frame.missed.unwrap_or(0);
    if let Some(since) = since {
        if epoch != since.epoch {
            return Err(violation(
                "another epoch on reconnecting (the history was lost)",
                format!("had {}, got {text}", since.epoch),
            ));
        }
        if frame.recovered != Some(true) {
            return Err(violation("recovered: false", text.to_owned()));
        }
        if offset != since.last + missed {
            return Err(violation(
                "subscribed.offset is not since.offset + missed",
                format!("since {}, got {text}", since.last),
            ));
        }
    }
    let position = Position {
        epoch: epoch.into_owned(),
        last: offset,
        base: since.and_then(|s| s.base),
    };
    Ok((position, missed))
}

/// Checks a frame that must be the next publication of `topic` in `round` after `at`,
/// and moves `at` to it: the same epoch, the offset exactly one above the last (a
/// lower one is a duplicate, a higher one a gap), and the message published for it.
fn check_publication(
    text: &str,
    topic: &str,
    round: u32,
    at: &mut Position,
) -> Result<u64, Violation> {
    let frame = parse(text)?;
    if frame.kind != "pub" {
        return Err(violation(
            format!("a {:?} frame where a publication was due", frame.kind),
            text.to_owned(),
        ));
    }
    if frame.topic.as_deref() != Some(topic) {
        return Err(violation("a publication of another topic", text.to_owned()));
    }
    if frame.epoch.as_deref() != Some(at.epoch.as_str()) {
        return Err(violation(
            "a publication of another epoch",
            format!("epoch {}, got {text}", at.epoch),
        ));
    }
    let Some(offset) = frame.offset else {
        return Err(violation("a publication without offset", text.to_owned()));
    };
    if offset <= at.last {
        return Err(violation(
            "duplicate: a publication not above the last one",
            format!("offset {offset} after {}", at.last),
        ));
    }
    if offset > at.last + 1 {
        return Err(violation(
            "gap: a publication more than 1 above the last one",
            format!("offset {offset} after {}", at.last),
        ));
    }
    let Some(data) = frame.data else {
        return Err(violation(
            "a publication whose data is not the bench's message",
            text.to_owned(),
        ));
    };
    let seq = match at.base {
        Some(base) => offset - base,
        None => 0,
    };
    if data.round != round || data.seq != seq {
        return Err(violation(
            "a publication whose data is not the message published for its offset",
            format!(
                "offset {offset}: round {} seq {}, expected round {round} seq {seq}",
                data.round, data.seq
            ),
        ));
    }
    at.base.get_or_insert(offset);
    at.last = offset;
    Ok(offset)
}

/// The next text frame, answering Pings on the way.
async fn next_text(client: &mut Client, buf: &mut [u8]) -> Result<String, Violation> {
    loop {
        match client.conn.poll_event() {
            Ok(Some(Event::Text(text))) => return Ok(text.as_str().to_owned()),
            Ok(Some(Event::Close(frame))) => {
                let _ = client.flush().await;
                return Err(violation(
                    "closed by the server",
                    frame.map_or_else(|| "no status".to_owned(), |f| f.code.to_string()),
                ));
            }
            Ok(Some(Event::Binary(_))) => {
                return Err(violation("a binary frame on ringsocket.v1", ""));
            }
            Ok(Some(_)) => {
                if let Err(e) = client.flush().await {
                    return Err(violation("write failed", e.to_string()));
                }
            }
            Ok(None) => match client.stream.read(buf).await {
                Ok(0) => return Err(violation("connection lost (1006)", "")),
                Ok(n) => client.conn.handle_bytes(&buf[..n]),
                Err(e) => return Err(violation("read failed", e.to_string())),
            },
            Err(e) => return Err(violation("protocol error from the server", e.to_string())),
        }
    }
}

async fn send_text(client: &mut Client, text: String) -> Result<(), Violation> {
    client
        .conn
        .send_text(text)
        .map_err(|e| violation("cannot send", e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| violation("write failed", e.to_string()))?;
    Ok(())
}

/// Connects to the `/v1` endpoint `target` (from `source` if given) offering
/// [`PROTOCOL`], which the server must choose, and permessage-deflate with `deflate`.
async fn open_v1(
    target: &Target,
    deflate_offer: bool,
    source: Option<IpAddr>,
) -> Result<Client, Violation> {
    let fail = |e: OpenError| violation(e.to_string(), "");
    let addr = target.addr;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| fail(OpenError::Connect(addr, e)))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| fail(OpenError::Connect(addr, e)))?;
    }
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| fail(OpenError::Connect(addr, e)))?;
    tcp.set_nodelay(true)
        .map_err(|e| fail(OpenError::Connect(addr, e)))?;
    let mut stream = BenchStream::Plain(tcp);
    let mut key = [0u8; 16];
    let mut mask_seed = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| fail(OpenError::Random(e)))?;
    getrandom::fill(&mut mask_seed).map_err(|e| fail(OpenError::Random(e)))?;
    let offer = [("Sec-WebSocket-Extensions", deflate::client_offer())];
    let mut out = BytesMut::new();
    let handshake = ClientRequest {
        host: &target.host,
        target: &target.path,
        protocols: &[PROTOCOL],
        headers: if deflate_offer { &offer } else { &[] },
    }
    .encode(key, &mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|e| fail(OpenError::Io(e)))?;
    let limits = HandshakeLimits::default();
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| fail(OpenError::Io(e)))?
            == 0
        {
            return Err(fail(OpenError::ClosedInHandshake));
        }
        if let Some((response, head_len)) = handshake
            .parse_response(&buf, &limits)
            .map_err(|e| fail(OpenError::Handshake(e)))?
        {
            if response.protocol.as_deref() != Some(PROTOCOL) {
                return Err(violation(
                    format!("the server did not choose the subprotocol {PROTOCOL}"),
                    target.url.clone(),
                ));
            }
            let mut conn =
                client::connection(target, &response, deflate_offer, mask_seed).map_err(fail)?;
            conn.handle_bytes(&buf[head_len..]);
            return Ok(Client { stream, conn });
        }
    }
}

/// What the coordinator asks of every worker, one step of a round at a time.
#[derive(Debug, Clone, Copy)]
enum Command {
    /// Connect every client and subscribe, fresh.
    Subscribe,
    /// Wait for the baseline publication.
    Baseline { round: u32 },
    /// Close every client cleanly.
    Close,
    /// Reconnect every client at once with `since`, and recover.
    Reconnect { round: u32, wave_start: Instant },
    /// Wait for the live publication.
    Live { round: u32 },
}

/// What one worker saw in one step.
#[derive(Debug)]
struct StepStats {
    /// Clients that completed the step.
    done: u64,
    failures: BTreeMap<String, u64>,
    first_failure: Option<String>,
    /// Reconnect: wave start → handshake completed, and → recovered.
    handshake: Histogram<u64>,
    recovery: Histogram<u64>,
    /// Reconnect: when the last handshake completed.
    last_open: Option<Instant>,
    partly_live: u64,
    close_failures: u64,
    /// Subscribe: the epoch and offset the clients started from (the first seen).
    start: Option<(String, u64)>,
}

impl StepStats {
    fn new() -> Self {
        Self {
            done: 0,
            failures: BTreeMap::new(),
            first_failure: None,
            handshake: stats::new_histogram(),
            recovery: stats::new_histogram(),
            last_open: None,
            partly_live: 0,
            close_failures: 0,
            start: None,
        }
    }

    fn fail(&mut self, v: &Violation) {
        stats::count(&mut self.failures, v.cause.clone(), 1);
        if self.first_failure.is_none() {
            self.first_failure = Some(v.to_string());
        }
    }

    fn merge(&mut self, other: StepStats) {
        self.done += other.done;
        stats::merge_counts(&mut self.failures, other.failures);
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.handshake.add(&other.handshake);
        let _ = self.recovery.add(&other.recovery);
        self.last_open = self.last_open.max(other.last_open);
        self.partly_live += other.partly_live;
        self.close_failures += other.close_failures;
        if self.start.is_none() {
            self.start = other.start;
        }
    }
}

/// One client of a worker: its connection and position, while it has not failed in
/// this round.
#[derive(Debug)]
struct Slot {
    index: usize,
    client: Option<Client>,
    at: Option<Position>,
    failed: bool,
}

/// What a client's part of a step returns beside its slot.
#[derive(Debug, Default)]
struct Outcome {
    opened: Option<Instant>,
    recovered: Option<Instant>,
    partly_live: bool,
    close_failed: bool,
}

/// One load generator thread and its share of the clients.
struct Worker {
    target: Arc<Target>,
    topic: Arc<str>,
    missed: u64,
    deflate: bool,
    spread: u8,
    timeout: Duration,
    slots: Vec<Slot>,
}

impl Worker {
    fn run(
        mut self,
        commands: tokio_mpsc::UnboundedReceiver<Command>,
        replies: mpsc::Sender<StepStats>,
    ) {
        let runtime = match new_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                // Every step fails every client of this thread.
                let mut commands = commands;
                while commands.blocking_recv().is_some() {
                    let mut stats = StepStats::new();
                    stats::count(
                        &mut stats.failures,
                        format!("cannot start a runtime: {e}"),
                        self.slots.len() as u64,
                    );
                    if replies.send(stats).is_err() {
                        return;
                    }
                }
                return;
            }
        };
        LocalSet::new().block_on(&runtime, async move {
            let mut commands = commands;
            while let Some(command) = commands.recv().await {
                let stats = self.step(command).await;
                if replies.send(stats).is_err() {
                    return;
                }
            }
            // The coordinator is done: close what is still open.
            let _ = self.step(Command::Close).await;
        });
    }

    /// Runs `command` on every client that has not failed, all at once.
    async fn step(&mut self, command: Command) -> StepStats {
        if let Command::Subscribe = command {
            for slot in &mut self.slots {
                slot.client = None;
                slot.at = None;
                slot.failed = false;
            }
        }
        let mut stats = StepStats::new();
        let mut handles = Vec::new();
        for mut slot in std::mem::take(&mut self.slots) {
            let skip = slot.failed || (matches!(command, Command::Close) && slot.client.is_none());
            if skip {
                self.slots.push(slot);
                continue;
            }
            let target = self.target.clone();
            let topic = self.topic.clone();
            let (missed, deflate, timeout) = (self.missed, self.deflate, self.timeout);
            let source = target.source_for(slot.index, self.spread);
            handles.push(tokio::task::spawn_local(async move {
                let work =
                    client_step(&mut slot, command, &target, &topic, missed, deflate, source);
                let result = match tokio::time::timeout(timeout, work).await {
                    Ok(result) => result,
                    Err(_) => Err(violation(
                        format!("timed out after {:.1} s (--timeout)", timeout.as_secs_f64()),
                        format!("{command:?}"),
                    )),
                };
                (slot, result)
            }));
        }
        for handle in handles {
            match handle.await {
                Ok((mut slot, result)) => {
                    match result {
                        Ok(outcome) => {
                            stats.done += 1;
                            if let Command::Reconnect { wave_start, .. } = command {
                                if let Some(t) = outcome.opened {
                                    stats::record(&mut stats.handshake, t - wave_start);
                                    stats.last_open = stats.last_open.max(Some(t));
                                }
                                if let Some(t) = outcome.recovered {
                                    stats::record(&mut stats.recovery, t - wave_start);
                                }
                            }
                            if let (Command::Subscribe, None, Some(at)) =
                                (command, &stats.start, &slot.at)
                            {
                                stats.start = Some((at.epoch.clone(), at.last));
                            }
                            stats.partly_live += u64::from(outcome.partly_live);
                            stats.close_failures += u64::from(outcome.close_failed);
                        }
                        Err(v) => {
                            stats.fail(&v);
                            slot.failed = true;
                            slot.client = None;
                            slot.at = None;
                        }
                    }
                    self.slots.push(slot);
                }
                Err(e) => stats.fail(&violation("a client task failed", e.to_string())),
            }
        }
        self.slots.sort_by_key(|s| s.index);
        stats
    }
}

/// One client's part of a step.
async fn client_step(
    slot: &mut Slot,
    command: Command,
    target: &Target,
    topic: &str,
    missed: u64,
    deflate: bool,
    source: Option<IpAddr>,
) -> Result<Outcome, Violation> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut outcome = Outcome::default();
    let topic_json = serde_json::to_string(topic).unwrap_or_default();
    match command {
        Command::Subscribe => {
            let mut client = open_v1(target, deflate, source).await?;
            let request = format!(r#"{{"id":1,"type":"subscribe","topic":{topic_json}}}"#);
            send_text(&mut client, request).await?;
            let text = next_text(&mut client, &mut buf).await?;
            let (at, _) = check_subscribed(&text, 1, topic, None)?;
            slot.at = Some(at);
            slot.client = Some(client);
        }
        Command::Baseline { round } | Command::Live { round } => {
            let (Some(client), Some(at)) = (slot.client.as_mut(), slot.at.as_mut()) else {
                return Err(violation("no connection (a bug in the bench)", ""));
            };
            let text = next_text(client, &mut buf).await?;
            check_publication(&text, topic, round, at)?;
        }
        Command::Close => {
            if let Some(mut client) = slot.client.take() {
                outcome.close_failed = !client.close(Duration::from_secs(5)).await;
            }
        }
        Command::Reconnect { round, .. } => {
            let Some(since) = slot.at.clone() else {
                return Err(violation("no position (a bug in the bench)", ""));
            };
            let Some(base) = since.base else {
                return Err(violation("no baseline (a bug in the bench)", ""));
            };
            let mut client = open_v1(target, deflate, source).await?;
            outcome.opened = Some(Instant::now());
            let epoch_json = serde_json::to_string(&since.epoch).unwrap_or_default();
            let request = format!(
                r#"{{"id":2,"type":"subscribe","topic":{topic_json},"since":{{"offset":{},"epoch":{epoch_json}}}}}"#,
                since.last
            );
            send_text(&mut client, request).await?;
            let text = next_text(&mut client, &mut buf).await?;
            let (mut at, served) = check_subscribed(&text, 2, topic, Some(&since))?;
            outcome.partly_live = served < missed;
            // Every publication after `since`, from the history and then live.
            at.last = since.last;
            while at.last < base + missed {
                let text = next_text(&mut client, &mut buf).await?;
                check_publication(&text, topic, round, &mut at)?;
            }
            outcome.recovered = Some(Instant::now());
            slot.at = Some(at);
            slot.client = Some(client);
        }
    }
    Ok(outcome)
}

/// The CPU time of every thread of process `pid` so far, in nanoseconds: the first
/// field of each `/proc/PID/task/TID/schedstat` (time on a CPU, user and system
/// together). Threads that exited are not counted; the server's live for its life.
fn schedstat_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += text.split_ascii_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A blocking HTTP/1.1 client on one keep-alive connection, for the publisher.
struct Http {
    addr: SocketAddr,
    host: String,
    token: Option<String>,
    timeout: Duration,
    stream: Option<StdTcpStream>,
}

impl Http {
    fn exchange(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        if self.stream.is_none() {
            let stream = StdTcpStream::connect_timeout(&self.addr, self.timeout)
                .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(self.timeout));
            let _ = stream.set_write_timeout(Some(self.timeout));
            self.stream = Some(stream);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("no connection".into());
        };
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if method == "POST" {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("cannot send {method} {path}: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = match stream.read(&mut chunk) {
                // A signal to this process (a child's exit, say) is no answer.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => read.map_err(|e| format!("no answer to {method} {path}: {e}"))?,
            };
            if n == 0 {
                return Err(format!(
                    "the server closed the connection before answering {method} {path}"
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let head_len = match response.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => continue,
                Err(e) => return Err(format!("a bad answer to {method} {path}: {e}")),
            };
            let status = response.code.unwrap_or(0);
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            };
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("an answer to {method} {path} without Content-Length"))?;
            let close = header("connection").is_some_and(|v| v == "close");
            while buf.len() < head_len + length {
                let n = match stream.read(&mut chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => {
                        read.map_err(|e| format!("the body of the answer to {method} {path}: {e}"))?
                    }
                };
                if n == 0 {
                    return Err(format!("the answer to {method} {path} was cut short"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[head_len..head_len + length]).into_owned();
            if close {
                self.stream = None;
            }
            return Ok((status, body));
        }
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), BenchError> {
        self.exchange(method, path, body).map_err(|e| {
            self.stream = None;
            BenchError::Scenario(e)
        })
    }

    /// Publishes `body` to `topic`; anything but 202 is an error.
    fn publish(&mut self, topic: &str, body: &str) -> Result<(), BenchError> {
        let path = format!("/publish/{topic}");
        match self.request("POST", &path, body)? {
            (202, _) => Ok(()),
            (status, answer) => Err(BenchError::Scenario(format!(
                "POST {path} answered {status}, not 202: {}",
                answer.trim()
            ))),
        }
    }

    /// The topic's epoch and last offset, from `GET /history/{topic}?limit=0`.
    fn position(&mut self, topic: &str) -> Result<(String, u64), BenchError> {
        #[derive(Deserialize)]
        struct Head {
            epoch: String,
            offset: u64,
        }
        let path = format!("/history/{topic}?limit=0");
        match self.request("GET", &path, "")? {
            (200, body) => serde_json::from_str::<Head>(&body)
                .map(|h| (h.epoch, h.offset))
                .map_err(|e| BenchError::Scenario(format!("GET {path}: {e}: {body}"))),
            (status, body) => Err(BenchError::Scenario(format!(
                "GET {path} answered {status}: {} (is it ringsocket serve?)",
                body.trim()
            ))),
        }
    }
}

/// The threads, the channels to them, and how to hear from all of them.
struct Crew {
    commands: Vec<tokio_mpsc::UnboundedSender<Command>>,
    replies: mpsc::Receiver<StepStats>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// How long a step may take on a thread before the bench gives up on it.
    patience: Duration,
}

impl Crew {
    /// Sends `command` to every thread and merges their answers.
    fn step(&self, command: Command) -> Result<StepStats, BenchError> {
        for tx in &self.commands {
            tx.send(command)
                .map_err(|_| BenchError::Runtime("a load generator thread died".into()))?;
        }
        let mut all = StepStats::new();
        for _ in &self.commands {
            let stats = self.replies.recv_timeout(self.patience).map_err(|_| {
                BenchError::Runtime(format!(
                    "a load generator thread did not finish {command:?} in {:.0} s",
                    self.patience.as_secs_f64()
                ))
            })?;
            all.merge(stats);
        }
        Ok(all)
    }

    fn finish(self) -> Result<(), BenchError> {
        drop(self.commands);
        for worker in self.workers {
            join_worker(worker)?;
        }
        Ok(())
    }
}

/// Runs `bench recover`. Fails when the server cannot be used (no client subscribes, a
/// publish is refused, the history does not advance); clients that do not recover
/// exactly are counted in the report, which then says so (`exact: false`).
pub fn recover(options: &RecoverOptions, progress: &Progress) -> Result<RecoverReport, BenchError> {
    options.validate()?;
    let v1 = v1_url(&options.url)?;
    let target = Arc::new(Target::resolve(&v1)?);
    if target.tls {
        return Err(BenchError::Options(format!(
            "{}: bench recover speaks plain ws:// and HTTP only",
            options.url
        )));
    }
    let threads = options.common.threads.min(options.clients);
    let timeout = options.common.timeout();
    let topic: Arc<str> = Arc::from(options.topic.as_str());
    let (replies_tx, replies) = mpsc::channel();
    let mut commands = Vec::with_capacity(threads);
    let mut workers = Vec::with_capacity(threads);
    for thread in 0..threads {
        let (tx, rx) = tokio_mpsc::unbounded_channel();
        let worker = Worker {
            target: target.clone(),
            topic: topic.clone(),
            missed: options.missed,
            deflate: options.common.deflate,
            spread: options.common.source_addrs,
            timeout,
            slots: (thread..options.clients)
                .step_by(threads)
                .map(|index| Slot {
                    index,
                    client: None,
                    at: None,
                    failed: false,
                })
                .collect(),
        };
        let replies = replies_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("bench-recover-{thread}"))
            .spawn(move || worker.run(rx, replies))
            .map_err(|e| BenchError::Runtime(format!("cannot start a thread: {e}")))?;
        commands.push(tx);
        workers.push(handle);
    }
    drop(replies_tx);
    let crew = Crew {
        commands,
        replies,
        workers,
        patience: timeout * 2 + Duration::from_secs(30),
    };
    let mut http = Http {
        addr: target.addr,
        host: target.host.clone(),
        token: options.publish_token.clone(),
        timeout,
        stream: None,
    };
    let result = run_rounds(options, &crew, &mut http, progress);
    progress.finish();
    let finished = crew.finish();
    let rounds = result?;
    finished?;

    let mut curve = stats::new_histogram();
    for (_, hist) in &rounds {
        let _ = curve.add(hist);
    }
    let rounds: Vec<RoundReport> = rounds.into_iter().map(|(r, _)| r).collect();
    let exact = rounds
        .iter()
        .all(|r| r.recovered_exactly == options.clients as u64);
    Ok(RecoverReport {
        url: options.url.clone(),
        v1_url: v1,
        topic: options.topic.clone(),
        clients: options.clients,
        missed: options.missed,
        size: options.size,
        threads,
        deflate: options.common.deflate,
        close: "clean",
        median: Medians::of(&rounds),
        rounds,
        exact,
        recovery_curve: stats::percentile_curve(&curve),
    })
}

fn run_rounds(
    options: &RecoverOptions,
    crew: &Crew,
    http: &mut Http,
    progress: &Progress,
) -> Result<Vec<(RoundReport, Histogram<u64>)>, BenchError> {
    let topic = options.topic.as_str();
    let n = options.clients as u64;
    let mut rounds = Vec::new();
    for round in 1..=options.rounds {
        let say =
            |what: String| progress.message(format!("round {round}/{}: {what}", options.rounds));
        let mut failures = BTreeMap::new();
        let mut first_failure = None;
        let mut note = |stats: &mut StepStats| {
            stats::merge_counts(&mut failures, std::mem::take(&mut stats.failures));
            if first_failure.is_none() {
                first_failure = stats.first_failure.take();
            }
        };

        say(format!(
            "connecting and subscribing {} clients",
            thousands(n)
        ));
        let mut subscribed = crew.step(Command::Subscribe)?;
        if subscribed.done == 0 {
            return Err(BenchError::Setup {
                failed: n,
                total: n,
                causes: subscribed.failures,
            });
        }
        let subscribed_count = subscribed.done;
        note(&mut subscribed);

        say("publishing the baseline".to_owned());
        let (_, before) = http.position(topic)?;
        http.publish(topic, &message(round, 0, options.size))?;
        let mut baseline = crew.step(Command::Baseline { round })?;
        note(&mut baseline);
        let (epoch, baseline_offset) = http.position(topic)?;
        if baseline_offset != before + 1 {
            return Err(BenchError::Scenario(format!(
                "{topic}: the offset went from {before} to {baseline_offset} for one publish: \
                 does something else publish to it? (see --topic)"
            )));
        }

        say("closing every client".to_owned());
        let mut closed = crew.step(Command::Close)?;
        note(&mut closed);
        let mut close_failures = closed.close_failures;

        say(format!("publishing {} messages", options.missed));
        let began = Instant::now();
        for seq in 1..=options.missed {
            http.publish(topic, &message(round, seq, options.size))?;
        }
        let target_offset = baseline_offset + options.missed;
        let deadline = Instant::now() + options.common.timeout();
        loop {
            let (e, offset) = http.position(topic)?;
            if e != epoch {
                return Err(BenchError::Scenario(format!(
                    "{topic}: the epoch changed from {epoch} to {e} while the clients were away"
                )));
            }
            match offset.cmp(&target_offset) {
                std::cmp::Ordering::Equal => break,
                std::cmp::Ordering::Greater => {
                    return Err(BenchError::Scenario(format!(
                        "{topic}: the offset reached {offset}, beyond {target_offset}: does \
                         something else publish to it? (see --topic)"
                    )));
                }
                std::cmp::Ordering::Less if Instant::now() > deadline => {
                    return Err(BenchError::Scenario(format!(
                        "{topic}: the history shows offset {offset} after --timeout, not \
                         {target_offset}"
                    )));
                }
                std::cmp::Ordering::Less => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        let publish_secs = began.elapsed().as_secs_f64();
        // The wave's HTTP connection is idle for a while: open a fresh one after it.
        http.stream = None;

        say(format!("{} clients reconnecting at once", thousands(n)));
        let pid = options.common.server_pid;
        let sched_start = pid.and_then(schedstat_ns);
        let cpu_start = CpuSample::take(pid);
        let wave_start = Instant::now();
        let mut wave = crew.step(Command::Reconnect { round, wave_start })?;
        let cpu = cpu_start.usage_until(&CpuSample::take(pid));
        let sched_end = pid.and_then(schedstat_ns);
        note(&mut wave);
        let recovered_count = wave.done;

        say("publishing the live message".to_owned());
        let live_start = Instant::now();
        http.publish(topic, &message(round, options.missed + 1, options.size))?;
        let mut live = crew.step(Command::Live { round })?;
        let live_secs = live_start.elapsed().as_secs_f64();
        note(&mut live);
        let recovered_exactly = live.done;

        say("closing every client".to_owned());
        let mut closed = crew.step(Command::Close)?;
        note(&mut closed);
        close_failures += closed.close_failures;

        let secs = |ns: u64| ns as f64 / 1e9;
        let recovered_messages = recovered_count * options.missed;
        let server_schedstat_secs = match (sched_start, sched_end) {
            (Some(a), Some(b)) => Some(secs(b.saturating_sub(a))),
            _ => None,
        };
        let recovery_us = LatencySummary::from_histogram(&wave.recovery);
        let report = RoundReport {
            round,
            epoch,
            baseline_offset,
            subscribed: subscribed_count,
            recovered_exactly,
            failures,
            first_failure,
            partly_live: wave.partly_live,
            publish_secs,
            wave_secs: wave.last_open.map_or(0.0, |t| {
                t.saturating_duration_since(wave_start).as_secs_f64()
            }),
            all_live_secs: if wave.recovery.is_empty() {
                0.0
            } else {
                secs(wave.recovery.max())
            },
            handshake_us: LatencySummary::from_histogram(&wave.handshake),
            recovery_us,
            live_secs,
            cpu_per_message: cpu.per_item_us(recovered_messages),
            server_schedstat_secs,
            server_schedstat_per_message_us: server_schedstat_secs
                .filter(|_| recovered_messages > 0)
                .map(|s| s * 1e6 / recovered_messages as f64),
            cpu,
            close_failures,
        };
        rounds.push((report, wave.recovery));
    }
    Ok(rounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "t";

    fn pub_frame(offset: u64, epoch: &str, round: u32, seq: u64) -> String {
        format!(
            r#"{{"type":"pub","topic":"t","offset":{offset},"epoch":"{epoch}","data":{}}}"#,
            message(round, seq, 60)
        )
    }

    #[test]
    fn messages_have_the_exact_size_and_parse_back() {
        for size in [40, 100, 1000] {
            let text = message(3, 101, size);
            assert_eq!(text.len(), size, "{text}");
            let data: Data = serde_json::from_str(&text).unwrap();
            assert_eq!((data.round, data.seq), (3, 101));
        }
        // Too small: as short as it can be.
        assert_eq!(message(1, 2, 0), r#"{"round":1,"seq":2,"pad":""}"#);
    }

    #[test]
    fn options_are_checked() {
        let ok = RecoverOptions::new("ws://127.0.0.1:9/");
        assert!(ok.validate().is_ok());
        let mut small = ok.clone();
        small.size = 20;
        assert!(
            small
                .validate()
                .unwrap_err()
                .to_string()
                .contains("--size 20")
        );
        let mut topic = ok.clone();
        topic.topic = "a/b".into();
        assert!(topic.validate().is_err());
        let mut tls = ok.clone();
        tls.common.tls = true;
        assert!(tls.validate().is_err());
        let mut none = ok;
        none.missed = 0;
        assert!(none.validate().is_err());
    }

    #[test]
    fn the_v1_url_is_on_the_base() {
        assert_eq!(v1_url("ws://h:1").unwrap(), "ws://h:1/v1");
        assert_eq!(v1_url("ws://h:1/").unwrap(), "ws://h:1/v1");
        assert_eq!(v1_url("ws://h:1/v1").unwrap(), "ws://h:1/v1");
        assert_eq!(v1_url("ws://h:1/?token=x").unwrap(), "ws://h:1/v1?token=x");
        assert_eq!(v1_url("ws://h:1?token=x").unwrap(), "ws://h:1/v1?token=x");
        assert!(v1_url("ws://h:1/echo").is_err());
    }

    #[test]
    fn schedstat_counts_this_process() {
        let pid = std::process::id();
        let a = schedstat_ns(pid).unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = schedstat_ns(pid).unwrap();
        // The spin runs on a test thread, which /proc/PID/schedstat (the main thread)
        // may not count: only that the counter is read and never goes back.
        assert!(b >= a, "{a} → {b}");
        assert!(x > 0);
        assert_eq!(schedstat_ns(u32::MAX), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn a_fresh_subscription_and_its_baseline() {
        let text = r#"{"id":1,"type":"subscribed","topic":"t","offset":7,"epoch":"e","recovered":false,"missed":0,"conflated":false}"#;
        let (mut at, missed) = check_subscribed(text, 1, TOPIC, None).unwrap();
        assert_eq!(missed, 0);
        assert_eq!(
            at,
            Position {
                epoch: "e".into(),
                last: 7,
                base: None
            }
        );
        assert_eq!(
            check_publication(&pub_frame(8, "e", 1, 0), TOPIC, 1, &mut at),
            Ok(8)
        );
        assert_eq!(at.base, Some(8));
        // Another id, an error frame, a publication first.
        assert!(check_subscribed(text, 2, TOPIC, None).is_err());
        let error = r#"{"id":1,"type":"error","code":"not_allowed","message":"no"}"#;
        let v = check_subscribed(error, 1, TOPIC, None).unwrap_err();
        assert_eq!(v.cause, "subscribe refused: not_allowed");
        assert!(check_subscribed(&pub_frame(8, "e", 1, 0), 1, TOPIC, None).is_err());
    }

    fn since() -> Position {
        Position {
            epoch: "e".into(),
            last: 10,
            base: Some(10),
        }
    }

    #[test]
    fn recovery_in_order_then_live() {
        let text = r#"{"id":2,"type":"subscribed","topic":"t","offset":13,"epoch":"e","recovered":true,"missed":3,"conflated":false}"#;
        let (mut at, missed) = check_subscribed(text, 2, TOPIC, Some(&since())).unwrap();
        assert_eq!((missed, at.last, at.base), (3, 13, Some(10)));
        at.last = 10;
        for offset in 11..=14 {
            check_publication(&pub_frame(offset, "e", 1, offset - 10), TOPIC, 1, &mut at).unwrap();
        }
        assert_eq!(at.last, 14);
    }

    #[test]
    fn every_way_recovery_can_go_wrong_is_caught() {
        let subscribed = |offset: u64, epoch: &str, recovered: bool, missed: u64| {
            format!(
                r#"{{"id":2,"type":"subscribed","topic":"t","offset":{offset},"epoch":"{epoch}","recovered":{recovered},"missed":{missed}}}"#
            )
        };
        let cause = |text: &str| {
            check_subscribed(text, 2, TOPIC, Some(&since()))
                .unwrap_err()
                .cause
        };
        assert_eq!(cause(&subscribed(13, "e", false, 3)), "recovered: false");
        assert!(cause(&subscribed(13, "f", true, 3)).starts_with("another epoch"));
        assert!(cause(&subscribed(14, "e", true, 3)).starts_with("subscribed.offset"));

        let publication = |offset: u64, epoch: &str, round: u32, seq: u64| {
            let mut at = since();
            check_publication(&pub_frame(offset, epoch, round, seq), TOPIC, 1, &mut at)
                .map_err(|v| v.cause)
        };
        assert_eq!(publication(11, "e", 1, 1), Ok(11));
        assert!(
            publication(10, "e", 1, 0)
                .unwrap_err()
                .starts_with("duplicate")
        );
        assert!(publication(12, "e", 1, 2).unwrap_err().starts_with("gap"));
        assert!(
            publication(11, "f", 1, 1)
                .unwrap_err()
                .contains("another epoch")
        );
        assert!(
            publication(11, "e", 1, 2)
                .unwrap_err()
                .contains("not the message")
        );
        assert!(
            publication(11, "e", 2, 1)
                .unwrap_err()
                .contains("not the message")
        );
        let mut at = since();
        let other_topic = pub_frame(11, "e", 1, 1).replace(r#""topic":"t""#, r#""topic":"u""#);
        assert!(check_publication(&other_topic, TOPIC, 1, &mut at).is_err());
        let no_data = r#"{"type":"pub","topic":"t","offset":11,"epoch":"e","data":"hi"}"#;
        assert!(check_publication(no_data, TOPIC, 1, &mut at).is_err());
        assert!(check_publication(r#"{"type":"pong"}"#, TOPIC, 1, &mut at).is_err());
        assert!(check_publication("not json", TOPIC, 1, &mut at).is_err());
        // Nothing moved on failure.
        assert_eq!(at, since());
    }
}
