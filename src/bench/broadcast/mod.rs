//! `bench broadcast`: subscribers and publishers in one room; every message a
//! publisher sends must reach every subscriber once and in order.
//!
//! The room is a URL on which every message a client sends goes to every other client
//! connected to it (the sender excluded): ringsocket's `/broadcast` and `/ws/{room}`,
//! the peers `tt-broadcast` and `bun/broadcast.js`. Publishers are members of the room
//! too; they read and discard what they get, and are not counted as receivers.
//!
//! With `--v1` the subscribers speak `ringsocket.v1` (docs/protocol.md) instead: each
//! connects to `/v1` on the URL's host (the URL's query kept, for a `?token=`),
//! offering the subprotocol `ringsocket.v1`, subscribes to `--topic` (default
//! `broadcast`, the topic of ringsocket's `/broadcast`; `/ws/{room}` publishes to topic
//! `{room}`) and waits for the `subscribed` reply before the run begins. The
//! publishers stay raw, on the URL. Every frame a subscriber then gets must be a
//! publication of the topic, and the message checked is its `data`: a `--payload
//! json` message embedded as it was sent, a binary one decoded from its base64
//! (`"encoding":"base64"`; a decode per delivery, which the load generator's CPU per
//! delivery includes). Everything else (loss, order, duplicates, latency, the ramp) is
//! counted as for raw subscribers, so that a run with `--v1` and one without, against
//! the same server, compare the cost of the envelope path with the raw one (see
//! [`v1`]).
//!
//! A message is binary, `--size` bytes, and starts with [`HEADER_BYTES`] bytes, all
//! little-endian: publisher id (u32), step (u32, 0 for the readiness probe), sequence
//! number (u64, from 0 in each step) and the time it was due to be sent (u64, in
//! nanoseconds since the bench started, on this process's monotonic clock); zeros pad
//! it to `--size`. With `--payload json` it is text instead, `--size` bytes of
//! `{"h":"<header>","d":[…]}`: the same four fields as 8, 8, 16 and 16 hex digits, then
//! market-data records (see [`super::payload`]). Publisher `p` of `P` sends message `k` of a step at
//! `start + k × P / rate`, in one write with every other message due by then; the
//! timestamp is the due time, not the write time, so a publisher held up by a server
//! that stopped reading counts that wait in the latency (no coordinated omission).
//!
//! Before the first step, publishers send probes until every subscriber has had one
//! from every publisher, so that no subscriber is counted as missing messages
//! published before the server put it in the room.
//!
//! Each subscriber keeps, per publisher, the next sequence number it expects and the
//! gaps below it. A message above the next one opens a gap; one that fills a gap is
//! counted as reordered; one below the next that fills no gap is a duplicate. After
//! the step, every publisher's count of sent messages is compared with what each
//! subscriber got: a message not received within `--grace` seconds after the step's
//! end is lost. Messages of an earlier step that arrive later are counted apart
//! (`stale`) and are not deliveries.
//!
//! `--ramp` runs steps of `--warmup` + `--duration` seconds, starting at `--rate`
//! and doubling it while steps pass, then bisecting (geometric mean) between the
//! highest rate that passed and the lowest that failed until they are within 10 %, or
//! `--max-steps` is reached. A step passes when no message was lost, duplicated,
//! reordered or malformed, no connection failed, the publishers sent at least 95 % of
//! the messages due, and the p99 publish-to-receipt latency is at most
//! `--max-p99-ms`. The result is the highest rate that passed.

mod conns;
mod layout;
mod message;
mod subs;
mod v1;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::watch;

use super::common::{CommonOptions, seconds, window};
use super::compare::{Figure, Summary};
use super::payload::Payload;
use super::stats::{
    self, CpuPerItem, CpuSample, CpuUsage, LatencySummary, Percentile, micros, thousands,
};
use super::{BenchError, Progress, join_worker};
use conns::Job;
use layout::Layout;
use message::JSON_MIN_SIZE;

/// Bytes at the start of every message: publisher id, step, sequence number, due time.
pub const HEADER_BYTES: usize = 24;

/// Options of `bench broadcast`; the defaults are those of the command line.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct BroadcastOptions {
    /// WebSocket URL of a room, where every message a client sends goes to every other
    /// client on the same URL, e.g. ws://127.0.0.1:9001/broadcast.
    pub url: String,
    /// Subscriber connections: they only receive, and each must get every message.
    #[arg(long, default_value_t = 100)]
    pub subs: usize,
    /// Publisher connections, sharing --rate; members of the room, not counted as
    /// receivers.
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// Bytes per message, at least 24: publisher, step, sequence number and send time
    /// (with --payload json at least 63).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// What the messages carry besides their header. With pattern they are binary; with
    /// json they are text, {"h":"<the header in 48 hex digits>","d":[…]}, the array cut
    /// to --size; try it with --deflate.
    #[arg(long, value_enum, default_value_t = Payload::Pattern)]
    pub payload: Payload,
    /// Messages per second over all publishers; with --ramp, the first step's rate.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Find the highest rate without loss: steps from --rate, doubling while a step
    /// passes, then bisecting to within 10 %. A step passes when nothing is lost,
    /// duplicated or reordered, no connection fails, the publishers keep 95 % of the
    /// rate and p99 latency stays at most --max-p99-ms.
    #[arg(long)]
    pub ramp: bool,
    /// Measured time, in seconds, after the warm-up (with --ramp: of each step).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up time, in seconds, not counted in rates and latency (with --ramp: of each
    /// step); its messages are checked for loss like the others.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// How long after the end a message may still arrive, in seconds; later, it is
    /// lost.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// With --ramp: a step whose p99 publish-to-receipt latency is above this many
    /// milliseconds fails.
    #[arg(long, default_value_t = 500.0)]
    pub max_p99_ms: f64,
    /// With --ramp: at most this many steps.
    #[arg(long, default_value_t = 16)]
    pub max_steps: u32,
    /// Subscribers speak ringsocket.v1: they connect to /v1 on the URL's host (with the
    /// URL's query), offer Sec-WebSocket-Protocol: ringsocket.v1, subscribe to --topic
    /// and wait for "subscribed"; each message is the "data" of a publication (JSON as
    /// sent, binary decoded from base64). Publishers stay raw, on the URL.
    #[arg(long)]
    pub v1: bool,
    /// With --v1: the topic the subscribers subscribe to, the one the URL's room
    /// publishes to (/broadcast: broadcast; /ws/{room}: {room}).
    #[arg(long, default_value = "broadcast", requires = "v1")]
    pub topic: String,
    /// Rooms the publishers and subscribers are spread over: the URL (and every
    /// --sub-urls URL, and with --v1 the --topic) holds {room}, replaced by the
    /// room's number; publisher p is in room p mod N, subscriber i in room i mod N,
    /// and each subscriber must get every message of its room's publishers.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Where the subscribers connect instead of the URL, round-robin (subscriber i of
    /// room r: URL (i / --rooms) mod count), e.g. a second node sharing a broker with
    /// the URL's; the publishers stay on the URL, and each sub URL's latency is
    /// reported apart.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub sub_urls: Vec<String>,
    /// Threads, source addresses, timeout, server pid.
    #[command(flatten)]
    pub common: CommonOptions,
}

impl BroadcastOptions {
    /// The command line's defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            subs: 100,
            pubs: 1,
            size: 64,
            payload: Payload::Pattern,
            rate: 100.0,
            ramp: false,
            duration: 10.0,
            warmup: 2.0,
            grace: 2.0,
            max_p99_ms: 500.0,
            max_steps: 16,
            v1: false,
            topic: "broadcast".to_owned(),
            rooms: 1,
            sub_urls: Vec::new(),
            common: CommonOptions::default(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |what: String| Err(BenchError::Options(what));
        self.common.validate()?;
        if self.subs == 0 || self.pubs == 0 || self.max_steps == 0 {
            return bad("--subs, --pubs and --max-steps must be at least 1".into());
        }
        if u32::try_from(self.pubs).is_err() {
            return bad("--pubs must fit in 32 bits".into());
        }
        if self.size < HEADER_BYTES {
            return bad(format!(
                "--size must be at least {HEADER_BYTES}: every message carries its publisher, \
                 step, sequence number and send time"
            ));
        }
        if self.payload == Payload::Json && self.size < JSON_MIN_SIZE {
            return bad(format!(
                "--size must be at least {JSON_MIN_SIZE} with --payload json: \
                 {{\"h\":\"<48 hex digits>\",\"d\":[]}}"
            ));
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("--rate must be a number of messages per second above 0".into());
        }
        if !(self.max_p99_ms.is_finite() && self.max_p99_ms > 0.0) {
            return bad("--max-p99-ms must be above 0".into());
        }
        if self.v1 && self.topic.is_empty() {
            return bad("--topic must not be empty".into());
        }
        Layout::validate(self)?;
        seconds("--grace", self.grace)?;
        window(self.warmup, self.duration)
    }
}

/// What `bench broadcast` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastReport {
    /// The room.
    pub url: String,
    /// With --v1: the ringsocket.v1 endpoint the subscribers connected to, and their
    /// topic; `None` when they were in the room.
    pub v1: Option<V1Subscribers>,
    /// Rooms the connections were spread over (--rooms).
    pub rooms: usize,
    /// Where the subscribers connected, round-robin (--sub-urls); empty: the URL.
    pub sub_urls: Vec<String>,
    /// Whether every connection negotiated permessage-deflate (--deflate; without it
    /// the run fails).
    pub deflate: bool,
    /// Subscriber connections.
    pub subs: usize,
    /// Publisher connections.
    pub pubs: usize,
    /// Bytes per message.
    pub size: usize,
    /// What the messages carried (--payload): binary with the pattern, or JSON text.
    pub payload: Payload,
    /// Load generator threads.
    pub threads: usize,
    /// Whether the rate was ramped.
    pub ramp: bool,
    /// The rate asked for (with --ramp: of the first step), messages per second.
    pub rate: f64,
    /// Warm-up of each step, in seconds.
    pub warmup_secs: f64,
    /// Measured time of each step, in seconds.
    pub duration_secs: f64,
    /// Grace after each step, in seconds.
    pub grace_secs: f64,
    /// Every step run (one without --ramp).
    pub steps: Vec<StepReport>,
    /// With --ramp: the highest rate that passed (messages per second), if any did.
    pub max_loss_free_rate: Option<f64>,
    /// Connections that failed during the run, by cause.
    pub error_causes: BTreeMap<String, u64>,
    /// Connections whose closing handshake at the end did not complete.
    pub close_failures: u64,
}

/// Where `--v1` subscribers subscribed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V1Subscribers {
    /// The `/v1` URL.
    pub url: String,
    /// The topic.
    pub topic: String,
}

/// The latency of the subscribers on one `--sub-urls` URL.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubUrlLatency {
    /// The URL as given.
    pub url: String,
    /// Its subscribers' publish-to-receipt latency in the measured window.
    pub latency_us: LatencySummary,
}

/// One step: a fixed rate for warm-up plus duration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// Messages per second asked of the publishers, over all of them.
    pub target_rate: f64,
    /// Messages the publishers sent, warm-up included.
    pub published: u64,
    /// `published` over warm-up plus duration.
    pub publish_rate: f64,
    /// `published × subscribers`.
    pub expected: u64,
    /// Distinct expected messages received, at any time up to the end of the grace.
    pub delivered: u64,
    /// Deliveries received within the measured window.
    pub window_deliveries: u64,
    /// `window_deliveries` per second.
    pub deliveries_per_sec: f64,
    /// Publish-to-receipt latency of the deliveries in the measured window.
    pub latency_us: LatencySummary,
    /// Its distribution, for plots.
    pub latency_curve: Vec<Percentile>,
    /// With more than one --sub-urls: the latency of each one's subscribers (in
    /// --sub-urls order), e.g. through the broker apart from local.
    pub latency_by_sub_url: Vec<SubUrlLatency>,
    /// How late the publishers wrote the messages due in the measured window (from the
    /// time each was due to the end of its write): the load generator's own share of
    /// the latency, which counts from the due time.
    pub publish_lag_us: LatencySummary,
    /// Expected messages not received by the end of the grace.
    pub lost: u64,
    /// Messages received again.
    pub duplicated: u64,
    /// Messages received after a later one of the same publisher.
    pub reordered: u64,
    /// Messages of an earlier step (or readiness probes) received during this one.
    pub stale: u64,
    /// Messages that were not the bench's (too short, wrong size, unknown publisher).
    pub malformed: u64,
    /// The first of them, described.
    pub first_malformed: Option<String>,
    /// Connections that failed during the step.
    pub failed_connections: u64,
    /// CPU use over the measured window.
    pub cpu: CpuUsage,
    /// CPU time per delivery in the measured window: the load generator's own cost of
    /// receiving (and publishing) it, and the server's.
    pub cpu_per_delivery: CpuPerItem,
    /// Whether the step passed the ramp's criterion, and if not, why.
    pub verdict: Verdict,
}

/// The ramp's judgement of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verdict {
    /// Every message arrived once, in order, in time.
    Pass,
    /// Connections failed.
    ConnectionsFailed,
    /// Messages were lost.
    Lost,
    /// Messages arrived twice, out of order, or were not the bench's.
    Corrupted,
    /// The publishers sent less than 95 % of the messages due: the server held up
    /// their writes (or the load generator could not keep up).
    PublishersBehind,
    /// p99 latency above --max-p99-ms.
    SlowP99,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "pass",
            Self::ConnectionsFailed => "connections failed",
            Self::Lost => "lost messages",
            Self::Corrupted => "duplicated, reordered or malformed messages",
            Self::PublishersBehind => "publishers behind the rate",
            Self::SlowP99 => "p99 above --max-p99-ms",
        })
    }
}

impl BroadcastReport {
    /// Without --ramp: whether every message reached every subscriber once, in order,
    /// and no connection failed. With --ramp (where failing steps are the point):
    /// whether no connection failed and some rate passed.
    pub fn is_clean(&self) -> bool {
        if !self.error_causes.is_empty() {
            return false;
        }
        if self.ramp {
            return self.max_loss_free_rate.is_some();
        }
        self.steps.iter().all(|s| {
            s.lost == 0
                && s.duplicated == 0
                && s.reordered == 0
                && s.malformed == 0
                && s.failed_connections == 0
        })
    }

    /// The step the headline figures come from: the only one, or with --ramp the
    /// fastest that passed (the last one run when none did).
    pub fn result(&self) -> Option<&StepReport> {
        if self.ramp {
            let best = self
                .steps
                .iter()
                .filter(|s| s.verdict == Verdict::Pass)
                .max_by(|a, b| a.target_rate.total_cmp(&b.target_rate));
            best.or(self.steps.last())
        } else {
            self.steps.first()
        }
    }
}

impl Summary for BroadcastReport {
    const MODE: &'static str = "broadcast";
    const LATENCY: &'static str = "publish-to-receipt";

    fn url(&self) -> &str {
        &self.url
    }

    fn figures(&self) -> Vec<Figure> {
        let mut figures = Vec::new();
        if self.ramp {
            figures.push(Figure::more(
                "highest loss-free msg/s",
                self.max_loss_free_rate,
            ));
        }
        if let Some(s) = self.result() {
            let l = &s.latency_us;
            figures.extend([
                Figure::more("deliveries/s", s.deliveries_per_sec),
                Figure::less("latency p50 µs", l.p50),
                Figure::less("latency p90 µs", l.p90),
                Figure::less("latency p99 µs", l.p99),
                Figure::less("latency p99.9 µs", l.p999),
                Figure::less("latency max µs", l.max),
                Figure::less("lost", s.lost as f64),
                Figure::less("duplicated", s.duplicated as f64),
                Figure::less("reordered", s.reordered as f64),
                Figure::less("server CPU µs/delivery", s.cpu_per_delivery.server_us),
                Figure::less("server CPU %", s.cpu.server_percent),
                Figure::less("load generator CPU %", s.cpu.client_percent),
            ]);
        }
        figures
    }

    fn latency_curve(&self) -> &[Percentile] {
        self.result().map_or(&[], |s| &s.latency_curve)
    }

    fn failure(&self) -> Option<String> {
        if self.is_clean() {
            return None;
        }
        let failed: u64 = self.error_causes.values().sum();
        if self.ramp && failed == 0 {
            return Some(format!(
                "no rate passed, down to {} msg/s",
                self.steps
                    .iter()
                    .map(|s| s.target_rate)
                    .fold(f64::INFINITY, f64::min)
            ));
        }
        let (mut lost, mut duplicated, mut reordered, mut malformed) = (0, 0, 0, 0);
        for s in &self.steps {
            lost += s.lost;
            duplicated += s.duplicated;
            reordered += s.reordered;
            malformed += s.malformed;
        }
        Some(format!(
            "broadcast saw {failed} failed connections, {lost} lost, {duplicated} duplicated, \
             {reordered} reordered and {malformed} malformed messages"
        ))
    }
}

impl fmt::Display for BroadcastReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench broadcast {}{}",
            self.url,
            stats::transport(false, self.deflate)
        )?;
        writeln!(
            f,
            "  {} subscribers, {} publisher(s), {} B {} messages, {} thread(s); {}{} s warm-up, {} s measured, {} s grace",
            thousands(self.subs as u64),
            self.pubs,
            self.size,
            match self.payload {
                Payload::Pattern => "binary",
                Payload::Json => "JSON text",
            },
            self.threads,
            if self.ramp { "steps of " } else { "" },
            self.warmup_secs,
            self.duration_secs,
            self.grace_secs
        )?;
        if self.rooms > 1 {
            writeln!(
                f,
                "  {} rooms: publisher p in room p mod {}, subscriber i in room i mod {}",
                self.rooms, self.rooms, self.rooms
            )?;
        }
        if !self.sub_urls.is_empty() {
            writeln!(
                f,
                "  subscribers on {}, round-robin; publishers on the URL",
                self.sub_urls.join(", ")
            )?;
        }
        if let Some(v1) = &self.v1 {
            writeln!(
                f,
                "  subscribers: ringsocket.v1 on {}, topic {:?}; publishers raw on the URL",
                v1.url, v1.topic
            )?;
        }
        if self.ramp {
            writeln!(
                f,
                "  {:>12} {:>12} {:>14} {:>10} {:>10} {:>8} {:>5} {:>5}  verdict",
                "target msg/s",
                "sent msg/s",
                "deliveries/s",
                "p50 µs",
                "p99 µs",
                "lost",
                "dup",
                "reord"
            )?;
            for s in &self.steps {
                writeln!(
                    f,
                    "  {:>12} {:>12} {:>14} {:>10} {:>10} {:>8} {:>5} {:>5}  {}",
                    thousands(s.target_rate.round() as u64),
                    thousands(s.publish_rate.round() as u64),
                    thousands(s.deliveries_per_sec.round() as u64),
                    micros(s.latency_us.p50),
                    micros(s.latency_us.p99),
                    thousands(s.lost),
                    s.duplicated,
                    s.reordered,
                    s.verdict
                )?;
            }
            match self.max_loss_free_rate {
                Some(rate) => writeln!(
                    f,
                    "  highest rate without loss: {} msg/s; that step:",
                    thousands(rate.round() as u64)
                )?,
                None => writeln!(f, "  no rate passed; the last step:")?,
            }
        }
        if let Some(s) = self.result() {
            write_step(f, s)?;
        }
        stats::write_causes(f, "errors", &self.error_causes)?;
        stats::write_close_failures(f, self.close_failures)
    }
}

fn write_step(f: &mut fmt::Formatter<'_>, s: &StepReport) -> fmt::Result {
    writeln!(
        f,
        "  published   {} at {} msg/s (asked {} msg/s)",
        thousands(s.published),
        thousands(s.publish_rate.round() as u64),
        thousands(s.target_rate.round() as u64)
    )?;
    writeln!(
        f,
        "  delivered   {} of {} expected; {} in the measured window = {} deliveries/s",
        thousands(s.delivered),
        thousands(s.expected),
        thousands(s.window_deliveries),
        thousands(s.deliveries_per_sec.round() as u64)
    )?;
    writeln!(f, "  latency     {}", s.latency_us)?;
    for by_url in &s.latency_by_sub_url {
        writeln!(f, "    on {}: {}", by_url.url, by_url.latency_us)?;
    }
    writeln!(
        f,
        "  pub. lag    {} (publishers' writes after the due time; part of the latency)",
        s.publish_lag_us
    )?;
    writeln!(
        f,
        "  lost        {}, duplicated {}, reordered {}, malformed {}{}",
        thousands(s.lost),
        thousands(s.duplicated),
        thousands(s.reordered),
        thousands(s.malformed),
        if s.stale > 0 {
            format!(
                " ({} stale: probes or an earlier step's, not counted)",
                thousands(s.stale)
            )
        } else {
            String::new()
        }
    )?;
    if let Some(first) = &s.first_malformed {
        writeln!(f, "    first malformed: {first}")?;
    }
    writeln!(f, "  cpu         {}", s.cpu)?;
    writeln!(f, "  cpu/deliv.  {}", s.cpu_per_delivery)?;
    writeln!(f, "  verdict     {}", s.verdict)
}

/// Runs `bench broadcast`: opens the subscribers and publishers, waits until every
/// subscriber hears every publisher, runs the step (or the ramp's steps) and returns
/// what was measured. Fails when a connection cannot be opened or the URL does not
/// behave as a room; losses and failures during the run are in the report.
pub fn broadcast(
    options: &BroadcastOptions,
    progress: &Progress,
) -> Result<BroadcastReport, BenchError> {
    options.validate()?;
    let layout = Arc::new(Layout::resolve(options)?);
    let conns = options.subs + options.pubs;
    let threads = options.common.threads.min(conns);
    let shared = Arc::new(Shared::new(options.pubs));
    let (phase_tx, phase_rx) = watch::channel(Phase::Idle);
    let (ready_tx, ready_rx) = mpsc::channel::<BTreeMap<String, u64>>();
    let (collect_tx, collect_rx) = mpsc::channel::<Collected>();
    let mut workers = Vec::with_capacity(threads);
    progress.message(format!("opening {} connections", thousands(conns as u64)));
    for thread in 0..threads {
        let job = Job {
            thread,
            threads,
            options: options.clone(),
            layout: layout.clone(),
            shared: shared.clone(),
            phase: phase_rx.clone(),
        };
        let ready = ready_tx.clone();
        let collect = collect_tx.clone();
        let worker = std::thread::Builder::new()
            .name(format!("bench-broadcast-{thread}"))
            .spawn(move || job.run(ready, collect))
            .map_err(|e| BenchError::Runtime(format!("cannot start a thread: {e}")))?;
        workers.push(worker);
    }
    drop((ready_tx, collect_tx, phase_rx));
    let stop = |workers: Vec<std::thread::JoinHandle<ThreadEnd>>| {
        let _ = phase_tx.send(Phase::Stop);
        for worker in workers {
            let _ = join_worker(worker);
        }
    };

    let mut failures = BTreeMap::new();
    for setup in ready_rx.iter().take(threads) {
        stats::merge_counts(&mut failures, setup);
    }
    let failed: u64 = failures.values().sum();
    if failed > 0 {
        stop(workers);
        progress.finish();
        return Err(BenchError::Setup {
            failed,
            total: conns as u64,
            causes: failures,
        });
    }

    // Readiness: every subscriber hears every publisher before the first step.
    progress.message("waiting until every subscriber hears every publisher".into());
    let _ = phase_tx.send(Phase::Probe);
    let deadline = Instant::now() + options.common.timeout();
    while shared.ready.load(Ordering::Relaxed) < options.subs as u64 {
        if Instant::now() >= deadline {
            let ready = shared.ready.load(Ordering::Relaxed);
            stop(workers);
            progress.finish();
            return Err(BenchError::Scenario(format!(
                "{}: after {:.1} s, {} of {} subscribers had not received a message from \
                 every publisher; is it a room that sends every message to every other \
                 connection?{}",
                options.url,
                options.common.timeout,
                options.subs as u64 - ready,
                options.subs,
                if options.v1 {
                    format!(
                        " (with --v1: does it publish to topic {:?}? see --topic)",
                        options.topic
                    )
                } else {
                    String::new()
                }
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut steps = Vec::new();
    let mut rate = options.rate;
    let (mut best, mut worst): (Option<f64>, Option<f64>) = (None, None);
    let mut failures_so_far = 0;
    for step in 1..=options.max_steps {
        let (report, failures_now) = run_step(
            options,
            &layout,
            step,
            rate,
            &shared,
            &phase_tx,
            &collect_rx,
            threads,
            progress,
        )?;
        let connections_failed = failures_now > failures_so_far;
        failures_so_far = failures_now;
        let passed = report.verdict == Verdict::Pass;
        steps.push(report);
        if !options.ramp || connections_failed {
            break;
        }
        if passed {
            best = Some(best.map_or(rate, |b| b.max(rate)));
        } else {
            worst = Some(worst.map_or(rate, |w| w.min(rate)));
        }
        rate = match (best, worst) {
            (Some(lo), None) => lo * 2.0,
            (None, Some(hi)) if hi / 2.0 >= 1.0 => hi / 2.0,
            (Some(lo), Some(hi)) if hi / lo > 1.1 => (lo * hi).sqrt(),
            _ => break,
        };
        settle(&shared, Duration::from_secs_f64(options.grace));
    }

    progress.message("closing".to_owned());
    let _ = phase_tx.send(Phase::Stop);
    let mut end = ThreadEnd::default();
    for worker in workers {
        let part = join_worker(worker)?;
        stats::merge_counts(&mut end.errors, part.errors);
        end.close_failures += part.close_failures;
    }
    progress.finish();
    Ok(BroadcastReport {
        url: options.url.clone(),
        v1: options.v1.then(|| V1Subscribers {
            url: layout.sub_target(0).url.clone(),
            topic: options.topic.clone(),
        }),
        rooms: options.rooms,
        sub_urls: options.sub_urls.clone(),
        deflate: options.common.deflate,
        subs: options.subs,
        pubs: options.pubs,
        size: options.size,
        payload: options.payload,
        threads,
        ramp: options.ramp,
        rate: options.rate,
        warmup_secs: options.warmup,
        duration_secs: options.duration,
        grace_secs: options.grace,
        max_loss_free_rate: if options.ramp { best } else { None },
        steps,
        error_causes: end.errors,
        close_failures: end.close_failures,
    })
}

/// Runs one step at `rate` and collects it; also returns the connection failures so
/// far over the whole run.
#[allow(clippy::too_many_arguments)] // the coordinator's state, passed down once
fn run_step(
    options: &BroadcastOptions,
    layout: &Layout,
    step: u32,
    rate: f64,
    shared: &Shared,
    phase: &watch::Sender<Phase>,
    collected: &mpsc::Receiver<Collected>,
    threads: usize,
    progress: &Progress,
) -> Result<(StepReport, u64), BenchError> {
    for p in &shared.published {
        p.store(0, Ordering::Relaxed);
    }
    shared.pubs_done.store(0, Ordering::Relaxed);
    shared.delivered.store(0, Ordering::Relaxed);
    let grace = Duration::from_secs_f64(options.grace);
    let start = Instant::now() + Duration::from_millis(20);
    let plan = Plan {
        step,
        rate_per_pub: rate / options.pubs as f64,
        start,
        warm_end: start + Duration::from_secs_f64(options.warmup),
        end: start + Duration::from_secs_f64(options.warmup + options.duration),
        grace,
    };
    let _ = phase.send(Phase::Step(plan));
    let label = if options.ramp {
        format!("step {step}: {} msg/s", thousands(rate.round() as u64))
    } else {
        format!("{} msg/s", thousands(rate.round() as u64))
    };
    progress.wait_until(plan.warm_end, || {
        format!(
            "{label}, warming up: {} deliveries",
            thousands(shared.delivered.load(Ordering::Relaxed))
        )
    });
    let cpu_start = CpuSample::take(options.common.server_pid);
    let at_start = shared.delivered.load(Ordering::Relaxed);
    progress.wait_until(plan.end, || {
        let n = shared.delivered.load(Ordering::Relaxed) - at_start;
        let secs = plan.warm_end.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{label}, measuring: {} deliveries/s",
            thousands((n as f64 / secs) as u64)
        )
    });
    let cpu = cpu_start.usage_until(&CpuSample::take(options.common.server_pid));

    // The publishers finish what was due, then the subscribers get the grace.
    let deadline = plan.end + grace;
    while shared.pubs_done.load(Ordering::Relaxed) < options.pubs as u64
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let published: Vec<u64> = shared
        .published
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .collect();
    let total: u64 = published.iter().sum();
    let expected = layout.expected(&published);
    let deadline = Instant::now().max(plan.end) + grace;
    progress.message(format!("{label}: waiting for the last deliveries"));
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = phase.send(Phase::Collect {
        plan,
        published: Arc::new(published),
    });
    let mut sum = Collected::empty();
    for _ in 0..threads {
        let part = collected
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| BenchError::Runtime("a load generator thread stopped answering".into()))?;
        sum.merge(part);
    }
    let all_secs = options.warmup + options.duration;
    let publish_rate = total as f64 / all_secs;
    let s = &sum.stats;
    let mut report = StepReport {
        target_rate: rate,
        published: total,
        publish_rate,
        expected,
        delivered: s.delivered,
        window_deliveries: s.window_deliveries,
        deliveries_per_sec: s.window_deliveries as f64 / options.duration,
        latency_us: LatencySummary::from_histogram(&s.latency),
        latency_curve: stats::percentile_curve(&s.latency),
        latency_by_sub_url: (0..layout.split_urls())
            .map(|i| SubUrlLatency {
                url: layout.sub_urls[i].clone(),
                latency_us: s
                    .latency_by_url
                    .get(i)
                    .map_or_else(LatencySummary::default, LatencySummary::from_histogram),
            })
            .collect(),
        publish_lag_us: LatencySummary::from_histogram(&s.publish_lag),
        lost: s.lost,
        duplicated: s.duplicated,
        reordered: s.reordered,
        stale: s.stale,
        malformed: s.malformed,
        first_malformed: s.first_malformed.clone(),
        failed_connections: 0,
        cpu_per_delivery: cpu.per_item_us(s.window_deliveries),
        cpu,
        verdict: Verdict::Pass,
    };
    report.verdict = if sum.failures > 0 {
        Verdict::ConnectionsFailed
    } else if report.lost > 0 {
        Verdict::Lost
    } else if report.duplicated + report.reordered + report.malformed > 0 {
        Verdict::Corrupted
    } else if (total as f64) < 0.95 * rate * all_secs {
        Verdict::PublishersBehind
    } else if report.latency_us.p99 > options.max_p99_ms * 1000.0 {
        Verdict::SlowP99
    } else {
        Verdict::Pass
    };
    Ok((report, sum.failures))
}

/// Waits until no message has arrived for 100 ms (a server that fell behind drains its
/// queues), at most `limit`.
fn settle(shared: &Shared, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = shared.received.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = shared.received.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// State shared by the coordinator and every thread.
#[derive(Debug)]
struct Shared {
    /// The origin of the timestamps in messages.
    base: Instant,
    /// Messages each publisher has sent in the current step.
    published: Vec<AtomicU64>,
    /// Publishers that sent everything due in the current step.
    pubs_done: AtomicU64,
    /// Distinct expected messages received in the current step, over all subscribers.
    delivered: AtomicU64,
    /// Every message received by a subscriber, of any step.
    received: AtomicU64,
    /// Subscribers that have had a probe from every publisher.
    ready: AtomicU64,
}

impl Shared {
    fn new(pubs: usize) -> Self {
        Self {
            base: Instant::now(),
            published: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
            pubs_done: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            received: AtomicU64::new(0),
            ready: AtomicU64::new(0),
        }
    }

    fn nanos_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What the coordinator asks of the connections.
#[derive(Debug, Clone)]
enum Phase {
    /// Opening.
    Idle,
    /// Publishers send probes (step 0) every 20 ms.
    Probe,
    /// A step at a fixed rate.
    Step(Plan),
    /// The step is over: each thread reports.
    Collect {
        plan: Plan,
        /// Messages each publisher sent in the step.
        published: Arc<Vec<u64>>,
    },
    /// Close and end.
    Stop,
}

/// One step's rate and instants; the same for every thread.
#[derive(Debug, Clone, Copy)]
struct Plan {
    step: u32,
    rate_per_pub: f64,
    start: Instant,
    warm_end: Instant,
    end: Instant,
    grace: Duration,
}

impl Plan {
    /// Messages each publisher sends in the step: those due before `end`.
    fn total(&self) -> u64 {
        let secs = self.end.saturating_duration_since(self.start).as_secs_f64();
        (secs * self.rate_per_pub).ceil() as u64
    }

    /// Messages due by `now`: message `k` is due at `start + k / rate`.
    fn due(&self, now: Instant) -> u64 {
        if now < self.start {
            return 0;
        }
        let secs = (now - self.start).as_secs_f64();
        ((secs * self.rate_per_pub).floor() as u64 + 1).min(self.total())
    }

    fn due_at(&self, seq: u64) -> Instant {
        self.start + Duration::from_secs_f64(seq as f64 / self.rate_per_pub)
    }
}

/// A step's counts on one thread (or, merged, on all).
#[derive(Debug)]
struct StepStats {
    latency: Histogram<u64>,
    /// With more than one sub URL: the latency of each one's subscribers (grown as
    /// they are recorded).
    latency_by_url: Vec<Histogram<u64>>,
    publish_lag: Histogram<u64>,
    delivered: u64,
    window_deliveries: u64,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    stale: u64,
    malformed: u64,
    first_malformed: Option<String>,
}

impl StepStats {
    fn new() -> Self {
        Self {
            latency: stats::new_histogram(),
            latency_by_url: Vec::new(),
            publish_lag: stats::new_histogram(),
            delivered: 0,
            window_deliveries: 0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            stale: 0,
            malformed: 0,
            first_malformed: None,
        }
    }

    fn merge(&mut self, other: StepStats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        if self.latency_by_url.len() < other.latency_by_url.len() {
            self.latency_by_url
                .resize_with(other.latency_by_url.len(), stats::new_histogram);
        }
        for (mine, theirs) in self.latency_by_url.iter_mut().zip(&other.latency_by_url) {
            let _ = mine.add(theirs);
        }
        let _ = self.publish_lag.add(&other.publish_lag);
        self.delivered += other.delivered;
        self.window_deliveries += other.window_deliveries;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.stale += other.stale;
        self.malformed += other.malformed;
        if self.first_malformed.is_none() {
            self.first_malformed = other.first_malformed;
        }
    }
}

/// A thread's report on a step.
#[derive(Debug)]
struct Collected {
    stats: StepStats,
    /// Connections of the thread that failed since the run began.
    failures: u64,
}

impl Collected {
    fn empty() -> Self {
        Self {
            stats: StepStats::new(),
            failures: 0,
        }
    }

    fn merge(&mut self, other: Collected) {
        self.stats.merge(other.stats);
        self.failures += other.failures;
    }
}

/// What a thread reports when it ends.
#[derive(Debug, Default)]
struct ThreadEnd {
    errors: BTreeMap<String, u64>,
    close_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_spreads_messages_over_the_step() {
        let start = Instant::now();
        let plan = Plan {
            step: 1,
            rate_per_pub: 100.0,
            start,
            warm_end: start,
            end: start + Duration::from_millis(700),
            grace: Duration::ZERO,
        };
        assert_eq!(plan.total(), 70);
        assert_eq!(plan.due(start), 1);
        assert_eq!(plan.due(start + Duration::from_millis(95)), 10);
        assert_eq!(plan.due(start + Duration::from_secs(5)), 70);
        assert_eq!(plan.due_at(10), start + Duration::from_millis(100));
    }

    #[test]
    fn options_are_checked() {
        let mut o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        assert!(o.validate().is_ok());
        o.size = HEADER_BYTES - 1;
        assert!(o.validate().is_err());
        o.size = 64;
        o.payload = Payload::Json;
        assert!(o.validate().is_ok());
        o.size = JSON_MIN_SIZE - 1;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--payload json")
        );
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.rate = 0.0;
        assert!(o.validate().is_err());
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.grace = -1.0;
        assert!(o.validate().is_err());
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.common.threads = 0;
        assert!(o.validate().is_err());
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.v1 = true;
        assert!(o.validate().is_ok());
        o.topic.clear();
        assert!(o.validate().unwrap_err().to_string().contains("--topic"));
    }
}
