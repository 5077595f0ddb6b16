//! `bench echo`: connections that each keep a number of messages in flight to an echo
//! endpoint, checking every echo's content and order and timing its round trip.
//!
//! Each connection writes its window of messages in one write, then, each time a read
//! brings echoes back, checks them and writes as many new ones, again in one write:
//! a pipeline that keeps `inflight` messages outstanding. A message carries its
//! sequence number (the low 32 bits, 8 hex digits) and a body derived from it: with
//! `--payload pattern` the digits are its first 8 bytes and `a..z` follows; with
//! `--payload json` it is `{"h":"<digits>","d":[…]}` (see [`super::payload`]). So
//! reordering, loss and corruption are each seen. Only the measured window counts:
//! echoes received after the warm-up and before the end, and the bytes read and
//! written then (`wire_bytes_*`, which with `--deflate` show the compression).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::LocalSet;

use super::client::{self, Client};
use super::common::{CommonOptions, window};
use super::compare::{Figure, Summary};
use super::payload::{JSON_OPEN, JsonArrays, Payload, hex, json_min_size, unhex};
use super::stats::{self, CpuPerItem, CpuSample, CpuUsage, LatencySummary, Percentile, thousands};
use super::target::Target;
use super::tls::Tls;
use super::{BenchError, Progress, join_worker, new_runtime};
use crate::proto::Event;

/// Bytes at the start of every message that carry its sequence number (with
/// `--payload pattern`; a JSON message carries them right after its opening `{"h":"`).
pub const SEQ_BYTES: usize = 8;

/// Where a JSON message's sequence number starts: after `{"h":"`.
pub(crate) const JSON_SEQ_AT: usize = JSON_OPEN.len();

/// The smallest `--size` of a JSON message: `{"h":"<8 digits>","d":[]}`.
pub(crate) const JSON_MIN_SIZE: usize = json_min_size(SEQ_BYTES);

/// Options of `bench echo`; the defaults are those of the command line.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EchoOptions {
    /// WebSocket URL of an endpoint that echoes every message, e.g.
    /// ws://127.0.0.1:9001/echo or wss://localhost:9443/echo.
    pub url: String,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Messages each connection keeps in flight (its pipeline depth).
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Payload bytes per message (at least 8: the sequence number; with --payload
    /// json at least 23).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Send binary messages instead of text.
    #[arg(long)]
    pub binary: bool,
    /// What the messages carry besides their sequence number. A json message is
    /// {"h":"<the sequence number in 8 hex digits>","d":[…]}, the array cut to --size;
    /// try it with --deflate.
    #[arg(long, value_enum, default_value_t = Payload::Pattern)]
    pub payload: Payload,
    /// Measured time, in seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up time, in seconds, not counted.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Threads, source addresses, timeout, server pid.
    #[command(flatten)]
    pub common: CommonOptions,
}

impl EchoOptions {
    /// The command line's defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            conns: 100,
            inflight: 16,
            size: 64,
            binary: false,
            payload: Payload::Pattern,
            duration: 10.0,
            warmup: 2.0,
            common: CommonOptions::default(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |what: String| Err(BenchError::Options(what));
        self.common.validate()?;
        if self.conns == 0 || self.inflight == 0 {
            return bad("--conns and --inflight must be at least 1".into());
        }
        if self.size < SEQ_BYTES {
            return bad(format!(
                "--size must be at least {SEQ_BYTES}: every message carries its sequence number"
            ));
        }
        if self.payload == Payload::Json && self.size < JSON_MIN_SIZE {
            return bad(format!(
                "--size must be at least {JSON_MIN_SIZE} with --payload json: \
                 {{\"h\":\"<8 hex digits>\",\"d\":[]}}"
            ));
        }
        window(self.warmup, self.duration)
    }
}

/// What `bench echo` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EchoReport {
    /// The endpoint.
    pub url: String,
    /// Whether the connections spoke TLS (a wss:// URL, or --tls).
    pub tls: bool,
    /// Whether every connection negotiated permessage-deflate (--deflate; without it
    /// the run fails).
    pub deflate: bool,
    /// Connections.
    pub conns: usize,
    /// Messages in flight per connection.
    pub inflight: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Binary (true) or text messages.
    pub binary: bool,
    /// What the messages carried (--payload).
    pub payload: Payload,
    /// Load generator threads.
    pub threads: usize,
    /// Warm-up, in seconds.
    pub warmup_secs: f64,
    /// The measured window, in seconds.
    pub duration_secs: f64,
    /// Echoes received in the measured window.
    pub messages: u64,
    /// `messages` per second.
    pub messages_per_sec: f64,
    /// Payload bytes per second, each way.
    pub bytes_per_sec: f64,
    /// Payload bytes echoed in the measured window (`messages × size`), each way.
    pub payload_bytes: u64,
    /// WebSocket bytes read from the server in the measured window: frame headers and
    /// payloads (compressed with --deflate), control frames included; after TLS
    /// decryption, so without TLS records.
    pub wire_bytes_read: u64,
    /// WebSocket bytes written to the server in the measured window, counted the same
    /// way (the writes that followed the window's reads).
    pub wire_bytes_written: u64,
    /// Round trips of the echoes received in the measured window.
    pub latency_us: LatencySummary,
    /// Their distribution, for plots.
    pub latency_curve: Vec<Percentile>,
    /// Echoes whose content, size, type or order was wrong.
    pub mismatches: u64,
    /// The first mismatch, described.
    pub first_mismatch: Option<String>,
    /// Connections that failed during the run.
    pub errors: u64,
    /// Those failures by cause.
    pub error_causes: BTreeMap<String, u64>,
    /// Messages sent and never echoed (before a failure or the final timeout).
    pub unanswered: u64,
    /// Connections whose closing handshake at the end did not complete.
    pub close_failures: u64,
    /// CPU use over the measured window.
    pub cpu: CpuUsage,
    /// CPU time per echoed message over the measured window: the load generator's own
    /// cost (sending and receiving one message) and the server's.
    pub cpu_per_message: CpuPerItem,
}

impl EchoReport {
    /// Whether every message came back intact, in order, on a connection that lived.
    pub fn is_clean(&self) -> bool {
        self.errors == 0 && self.mismatches == 0 && self.unanswered == 0
    }
}

impl Summary for EchoReport {
    const MODE: &'static str = "echo";
    const LATENCY: &'static str = "round-trip";

    fn url(&self) -> &str {
        &self.url
    }

    fn figures(&self) -> Vec<Figure> {
        let l = &self.latency_us;
        vec![
            Figure::more("messages/s", self.messages_per_sec),
            Figure::less("round trip p50 µs", l.p50),
            Figure::less("round trip p99 µs", l.p99),
            Figure::less("round trip p99.9 µs", l.p999),
            Figure::less("round trip max µs", l.max),
            Figure::less("server CPU µs/message", self.cpu_per_message.server_us),
            Figure::less("server CPU %", self.cpu.server_percent),
            Figure::less("load generator CPU %", self.cpu.client_percent),
        ]
    }

    fn latency_curve(&self) -> &[Percentile] {
        &self.latency_curve
    }

    fn failure(&self) -> Option<String> {
        (!self.is_clean()).then(|| {
            format!(
                "echo saw {} failed connections, {} mismatched and {} unanswered messages",
                self.errors, self.mismatches, self.unanswered
            )
        })
    }
}

impl fmt::Display for EchoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench echo {}{}",
            self.url,
            stats::transport(self.tls, self.deflate)
        )?;
        writeln!(
            f,
            "  {} connections × {} in flight, {} B {} messages ({} payload), {} thread(s); {} s warm-up, {} s measured",
            self.conns,
            self.inflight,
            self.size,
            if self.binary { "binary" } else { "text" },
            self.payload.name(),
            self.threads,
            self.warmup_secs,
            self.duration_secs
        )?;
        writeln!(
            f,
            "  messages    {} echoed = {} msg/s, {} each way",
            thousands(self.messages),
            thousands(self.messages_per_sec.round() as u64),
            stats::rate_bytes(self.bytes_per_sec)
        )?;
        writeln!(
            f,
            "  wire        {} read, {} written for {} of payload each way{}",
            stats::bytes(self.wire_bytes_read),
            stats::bytes(self.wire_bytes_written),
            stats::bytes(self.payload_bytes),
            wire_ratios(
                self.wire_bytes_read,
                self.wire_bytes_written,
                self.payload_bytes
            )
        )?;
        writeln!(f, "  round trip  {}", self.latency_us)?;
        writeln!(f, "  cpu         {}", self.cpu)?;
        writeln!(f, "  cpu/message {}", self.cpu_per_message)?;
        write!(f, "  mismatches  {}", self.mismatches)?;
        if let Some(first) = &self.first_mismatch {
            write!(f, " (first: {first})")?;
        }
        writeln!(f)?;
        stats::write_causes(f, "errors", &self.error_causes)?;
        if self.unanswered > 0 {
            write!(f, "\n  unanswered  {} messages", thousands(self.unanswered))?;
        }
        stats::write_close_failures(f, self.close_failures)
    }
}

/// Runs `bench echo`: opens every connection, then runs the warm-up and the measured
/// window, and returns what was measured. Fails when the endpoint cannot be reached or
/// any connection cannot be opened; failures during the run are in the report.
pub fn echo(options: &EchoOptions, progress: &Progress) -> Result<EchoReport, BenchError> {
    options.validate()?;
    let target = Arc::new(Target::resolve(&options.url)?);
    let tls = Tls::for_run(&target, &options.common)?;
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<Setup>();
    let mut plans = Vec::with_capacity(options.common.threads);
    let mut workers = Vec::with_capacity(options.common.threads);
    progress.message(format!("opening {} connections", options.conns));
    for thread in 0..options.common.threads {
        let (plan_tx, plan_rx) = mpsc::channel::<Option<Plan>>();
        plans.push(plan_tx);
        let job = Job {
            thread,
            options: options.clone(),
            target: target.clone(),
            tls: tls.clone(),
            received: received.clone(),
        };
        let ready = ready_tx.clone();
        let worker = std::thread::Builder::new()
            .name(format!("bench-echo-{thread}"))
            .spawn(move || job.run(ready, plan_rx))
            .map_err(|e| BenchError::Runtime(format!("cannot start a thread: {e}")))?;
        workers.push(worker);
    }
    drop(ready_tx);

    let mut failures = BTreeMap::new();
    let mut failed = 0;
    for setup in ready_rx.iter().take(options.common.threads) {
        failed += setup.failures.values().sum::<u64>();
        stats::merge_counts(&mut failures, setup.failures);
    }
    if failed > 0 {
        for plan in &plans {
            let _ = plan.send(None);
        }
        for worker in workers {
            let _ = join_worker(worker);
        }
        return Err(BenchError::Setup {
            failed,
            total: options.conns as u64,
            causes: failures,
        });
    }

    let start = Instant::now();
    let plan = Plan {
        warm_end: start + Duration::from_secs_f64(options.warmup),
        end: start + Duration::from_secs_f64(options.warmup + options.duration),
        grace: Duration::from_secs_f64(options.common.timeout),
    };
    for tx in &plans {
        let _ = tx.send(Some(plan));
    }
    progress.message("warming up".to_owned());
    progress.wait_until(plan.warm_end, || {
        format!(
            "warming up: {} echoes",
            thousands(received.load(Ordering::Relaxed))
        )
    });
    let cpu_start = CpuSample::take(options.common.server_pid);
    let at_start = received.load(Ordering::Relaxed);
    progress.wait_until(plan.end, || {
        let n = received.load(Ordering::Relaxed) - at_start;
        let secs = plan.warm_end.elapsed().as_secs_f64().max(1e-3);
        format!(
            "measuring: {} echoes, {} msg/s",
            thousands(n),
            thousands((n as f64 / secs) as u64)
        )
    });
    let cpu = cpu_start.usage_until(&CpuSample::take(options.common.server_pid));
    progress.message("closing".to_owned());

    let mut total = ThreadStats::new();
    for worker in workers {
        total.merge(join_worker(worker)?);
    }
    progress.finish();
    let secs = options.duration;
    Ok(EchoReport {
        url: options.url.clone(),
        tls: tls.is_some(),
        deflate: options.common.deflate,
        conns: options.conns,
        inflight: options.inflight,
        size: options.size,
        binary: options.binary,
        payload: options.payload,
        threads: options.common.threads,
        warmup_secs: options.warmup,
        duration_secs: secs,
        messages: total.messages,
        messages_per_sec: total.messages as f64 / secs,
        bytes_per_sec: (total.messages * options.size as u64) as f64 / secs,
        payload_bytes: total.messages * options.size as u64,
        wire_bytes_read: total.wire_read,
        wire_bytes_written: total.wire_written,
        latency_us: LatencySummary::from_histogram(&total.latency),
        latency_curve: stats::percentile_curve(&total.latency),
        mismatches: total.mismatches,
        first_mismatch: total.first_mismatch,
        errors: total.errors.values().sum(),
        error_causes: total.errors,
        unanswered: total.unanswered,
        close_failures: total.close_failures,
        cpu_per_message: cpu.per_item_us(total.messages),
        cpu,
    })
}

/// When the run's phases end; the same instants for every thread.
#[derive(Debug, Clone, Copy)]
struct Plan {
    warm_end: Instant,
    end: Instant,
    /// How long after `end` the last echoes may take.
    grace: Duration,
}

/// A thread's connections that opened, or why they did not.
#[derive(Debug)]
struct Setup {
    failures: BTreeMap<String, u64>,
}

/// What one thread counted.
#[derive(Debug)]
pub(crate) struct ThreadStats {
    latency: Histogram<u64>,
    messages: u64,
    /// Bytes read and written in the measured window.
    wire_read: u64,
    wire_written: u64,
    mismatches: u64,
    first_mismatch: Option<String>,
    errors: BTreeMap<String, u64>,
    unanswered: u64,
    close_failures: u64,
}

impl ThreadStats {
    fn new() -> Self {
        Self {
            latency: stats::new_histogram(),
            messages: 0,
            wire_read: 0,
            wire_written: 0,
            mismatches: 0,
            first_mismatch: None,
            errors: BTreeMap::new(),
            unanswered: 0,
            close_failures: 0,
        }
    }

    fn merge(&mut self, other: ThreadStats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        self.messages += other.messages;
        self.wire_read += other.wire_read;
        self.wire_written += other.wire_written;
        self.mismatches += other.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch = other.first_mismatch;
        }
        stats::merge_counts(&mut self.errors, other.errors);
        self.unanswered += other.unanswered;
        self.close_failures += other.close_failures;
    }

    fn mismatch(&mut self, why: String) {
        self.mismatches += 1;
        self.first_mismatch.get_or_insert(why);
    }
}

/// One load generator thread: its runtime, its share of the connections.
struct Job {
    thread: usize,
    options: EchoOptions,
    target: Arc<Target>,
    /// The run's TLS settings, shared by every thread; `None` for plain TCP.
    tls: Option<Arc<Tls>>,
    received: Arc<AtomicU64>,
}

impl Job {
    fn run(self, ready: mpsc::Sender<Setup>, plan: mpsc::Receiver<Option<Plan>>) -> ThreadStats {
        let mut failures = BTreeMap::new();
        let runtime = match new_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                failures.insert(format!("cannot start a runtime: {e}"), 1);
                let _ = ready.send(Setup { failures });
                return ThreadStats::new();
            }
        };
        let local = LocalSet::new();
        let opened = local.block_on(&runtime, self.open_all());
        let mut clients = Vec::with_capacity(opened.len());
        for result in opened {
            match result {
                Ok(client) => clients.push(client),
                Err(cause) => stats::count(&mut failures, cause, 1),
            }
        }
        let _ = ready.send(Setup { failures });
        let Ok(Some(plan)) = plan.recv() else {
            return ThreadStats::new();
        };
        let stats = Rc::new(RefCell::new(ThreadStats::new()));
        local.block_on(&runtime, self.run_all(clients, plan, stats.clone()));
        Rc::try_unwrap(stats).map_or_else(|_| ThreadStats::new(), RefCell::into_inner)
    }

    /// Opens this thread's connections, at most 256 handshakes at a time.
    async fn open_all(&self) -> Vec<Result<Client, String>> {
        let permits = Rc::new(Semaphore::new(256));
        let timeout = Duration::from_secs_f64(self.options.common.timeout);
        let handles: Vec<_> = (self.thread..self.options.conns)
            .step_by(self.options.common.threads)
            .map(|index| {
                let target = self.target.clone();
                let tls = self.tls.clone();
                let permits = permits.clone();
                let source = target.source_for(index, self.options.common.source_addrs);
                let deflate = self.options.common.deflate;
                tokio::task::spawn_local(async move {
                    let _permit = permits.acquire().await;
                    client::open(&target, tls.as_deref(), deflate, source, timeout)
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for handle in handles {
            out.push(
                handle
                    .await
                    .unwrap_or_else(|e| Err(format!("connection task failed: {e}"))),
            );
        }
        out
    }

    async fn run_all(&self, clients: Vec<Client>, plan: Plan, stats: Rc<RefCell<ThreadStats>>) {
        let messages = Rc::new(Messages::new(
            self.options.size,
            self.options.binary,
            self.options.payload,
        ));
        let handles: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let run = Run {
                    client,
                    plan,
                    inflight: self.options.inflight,
                    messages: messages.clone(),
                    stats: stats.clone(),
                    received: self.received.clone(),
                };
                tokio::task::spawn_local(run.go())
            })
            .collect();
        for handle in handles {
            if let Err(e) = handle.await {
                stats::count(
                    &mut stats.borrow_mut().errors,
                    format!("connection task failed: {e}"),
                    1,
                );
            }
        }
    }
}

/// Makes and checks the messages of a run.
#[derive(Debug)]
struct Messages {
    size: usize,
    binary: bool,
    body: Body,
}

/// What follows (or, in JSON, surrounds) a message's sequence number.
#[derive(Debug)]
enum Body {
    /// `a..z` repeated: the body of message `seq` is `pattern[seq % 26 + 8..][..size - 8]`.
    Pattern(Vec<u8>),
    /// The JSON arrays, `size - 21` bytes each.
    Json(JsonArrays),
}

impl Messages {
    fn new(size: usize, binary: bool, payload: Payload) -> Self {
        let body = match payload {
            Payload::Pattern => {
                Body::Pattern((0..size + 26).map(|i| b'a' + (i % 26) as u8).collect())
            }
            Payload::Json => Body::Json(JsonArrays::new(size.saturating_sub(JSON_MIN_SIZE - 2))),
        };
        Self { size, binary, body }
    }

    /// Where the sequence number's digits are.
    fn seq_at(&self) -> usize {
        match self.body {
            Body::Pattern(_) => 0,
            Body::Json(_) => JSON_SEQ_AT,
        }
    }

    /// The part of `pattern` that follows message `seq`'s sequence number.
    fn pattern_body<'a>(&self, pattern: &'a [u8], seq: u64) -> &'a [u8] {
        let start = (seq % 26) as usize + SEQ_BYTES;
        &pattern[start..start + self.size - SEQ_BYTES]
    }

    /// Message `seq`: its sequence number as 8 hex digits (the low 32 bits), then the
    /// pattern, or a JSON message around them. All ASCII, so that it is valid text too.
    fn make(&self, seq: u64) -> Vec<u8> {
        match &self.body {
            Body::Pattern(pattern) => {
                let mut out = Vec::with_capacity(self.size);
                out.extend_from_slice(&hex::<SEQ_BYTES>(seq));
                out.extend_from_slice(self.pattern_body(pattern, seq));
                out
            }
            Body::Json(arrays) => arrays.message(&hex::<SEQ_BYTES>(seq), seq),
        }
    }

    /// Checks that `payload` is message `seq`.
    fn check(&self, seq: u64, binary: bool, payload: &[u8]) -> Result<(), String> {
        if binary != self.binary {
            let kind = |b| if b { "binary" } else { "text" };
            return Err(format!(
                "message {seq} came back as {} instead of {}",
                kind(binary),
                kind(self.binary)
            ));
        }
        if payload.len() != self.size {
            return Err(format!(
                "message {seq} came back with {} bytes instead of {}",
                payload.len(),
                self.size
            ));
        }
        let at = self.seq_at();
        let head = &payload[at..at + SEQ_BYTES];
        if head != hex::<SEQ_BYTES>(seq) {
            return Err(match unhex(head) {
                Some(got) => format!(
                    "expected message {} (mod 2^32), got message {got}: out of order or lost",
                    seq as u32
                ),
                None => format!("message {seq}: corrupt sequence number {head:?}"),
            });
        }
        let intact = match &self.body {
            Body::Pattern(pattern) => payload[SEQ_BYTES..] == *self.pattern_body(pattern, seq),
            Body::Json(arrays) => arrays.matches(payload, SEQ_BYTES, seq),
        };
        if !intact {
            return Err(format!("message {seq}: payload differs from what was sent"));
        }
        Ok(())
    }
}

/// ` (wire/payload 0.31 read, 0.33 written)`, when there was payload.
fn wire_ratios(read: u64, written: u64, payload: u64) -> String {
    if payload == 0 {
        return String::new();
    }
    let ratio = |wire: u64| wire as f64 / payload as f64;
    format!(
        " (wire/payload {:.3} read, {:.3} written)",
        ratio(read),
        ratio(written)
    )
}

/// One connection's run.
struct Run {
    client: Client,
    plan: Plan,
    inflight: usize,
    messages: Rc<Messages>,
    stats: Rc<RefCell<ThreadStats>>,
    received: Arc<AtomicU64>,
}

/// How a connection's run ended.
enum End {
    /// Every message sent was echoed; close normally.
    Done,
    /// The connection failed for this reason.
    Failed(String),
}

impl Run {
    async fn go(mut self) {
        let mut sent_at = VecDeque::with_capacity(self.inflight);
        let end = self.pump(&mut sent_at).await;
        self.stats.borrow_mut().unanswered += sent_at.len() as u64;
        match end {
            End::Done => {
                if !self.client.close(Duration::from_secs(2)).await {
                    self.stats.borrow_mut().close_failures += 1;
                }
            }
            End::Failed(cause) => stats::count(&mut self.stats.borrow_mut().errors, cause, 1),
        }
    }

    /// Keeps `inflight` messages outstanding until the end of the plan, then waits for
    /// the last echoes.
    async fn pump(&mut self, sent_at: &mut VecDeque<Instant>) -> End {
        let plan = self.plan;
        let read_len = (self.inflight * (self.messages.size + 14)).clamp(4096, 64 * 1024);
        let mut buf = vec![0u8; read_len];
        let (mut next_send, mut next_recv) = (0u64, 0u64);
        for _ in 0..self.inflight {
            if let Err(end) = self.queue(next_send) {
                return end;
            }
            next_send += 1;
        }
        let now = Instant::now();
        sent_at.extend(std::iter::repeat_n(now, self.inflight));
        if let Err(e) = self.client.flush().await {
            return End::Failed(format!("write failed: {e}"));
        }
        let deadline = tokio::time::Instant::from_std(plan.end + plan.grace);
        while !sent_at.is_empty() {
            let read = tokio::time::timeout_at(deadline, self.client.stream.read(&mut buf));
            let n = match read.await {
                Err(_) => {
                    return End::Failed(format!(
                        "echoes still missing {:.1} s after the end",
                        plan.grace.as_secs_f64()
                    ));
                }
                Ok(Err(e)) => return End::Failed(format!("read failed: {e}")),
                Ok(Ok(0)) => {
                    return End::Failed(
                        "closed early by the server without a close frame (1006)".into(),
                    );
                }
                Ok(Ok(n)) => n,
            };
            let now = Instant::now();
            let measuring = now >= plan.warm_end && now < plan.end;
            let sending = now < plan.end;
            if measuring {
                self.stats.borrow_mut().wire_read += n as u64;
            }
            self.client.conn.handle_bytes(&buf[..n]);
            let (mut echoed, mut queued) = (0u64, 0usize);
            let mut failed = None;
            {
                let stats = self.stats.clone();
                let mut stats = stats.borrow_mut();
                loop {
                    let (binary, payload) = match self.client.conn.poll_event() {
                        Ok(Some(Event::Text(text))) => (false, text.into_bytes()),
                        Ok(Some(Event::Binary(bytes))) => (true, bytes),
                        Ok(Some(Event::Close(frame))) => {
                            failed = Some(match frame {
                                Some(frame) if frame.reason.is_empty() => {
                                    format!("closed early by the server with {}", frame.code)
                                }
                                Some(frame) => format!(
                                    "closed early by the server with {} ({})",
                                    frame.code, frame.reason
                                ),
                                None => {
                                    "closed early by the server with no status (1005)".to_owned()
                                }
                            });
                            break;
                        }
                        Ok(Some(_)) => continue, // Ping (answered) or Pong
                        Ok(None) => break,
                        Err(e) => {
                            failed = Some(format!("protocol error from the server: {e}"));
                            break;
                        }
                    };
                    let Some(sent) = sent_at.pop_front() else {
                        stats.mismatch("a message arrived with none in flight".into());
                        continue;
                    };
                    if let Err(why) = self.messages.check(next_recv, binary, &payload) {
                        stats.mismatch(why);
                    }
                    next_recv += 1;
                    echoed += 1;
                    if measuring {
                        stats.messages += 1;
                        stats::record(&mut stats.latency, now.saturating_duration_since(sent));
                    }
                    if sending {
                        if let Err(End::Failed(why)) = self.queue(next_send) {
                            failed = Some(why);
                            break;
                        }
                        next_send += 1;
                        queued += 1;
                    }
                }
            }
            self.received.fetch_add(echoed, Ordering::Relaxed);
            if queued > 0 {
                sent_at.extend(std::iter::repeat_n(Instant::now(), queued));
            }
            // Also writes the Close or Pong replies the connection queued.
            let flushed = self.client.flush().await;
            if let Some(why) = failed {
                return End::Failed(why);
            }
            match flushed {
                Ok(written) if measuring => self.stats.borrow_mut().wire_written += written,
                Ok(_) => {}
                Err(e) => return End::Failed(format!("write failed: {e}")),
            }
        }
        End::Done
    }

    fn queue(&mut self, seq: u64) -> Result<(), End> {
        let message = self.messages.make(seq);
        let sent = if self.messages.binary {
            self.client.conn.send_binary(Bytes::from(message))
        } else {
            // The message is ASCII; the fallback is never taken.
            self.client
                .conn
                .send_text(String::from_utf8(message).unwrap_or_default())
        };
        sent.map_err(|e| End::Failed(format!("cannot send: {e}")))
    }
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Run")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_their_check() {
        for binary in [false, true] {
            let m = Messages::new(64, binary, Payload::Pattern);
            for seq in [0u64, 1, 25, 26, 1 << 33] {
                let payload = m.make(seq);
                assert_eq!(payload.len(), 64);
                assert!(payload.is_ascii());
                assert_eq!(m.check(seq, binary, &payload), Ok(()));
            }
        }
    }

    #[test]
    fn mismatches_are_named() {
        let m = Messages::new(16, true, Payload::Pattern);
        let p = m.make(7);
        assert!(m.check(6, true, &p).unwrap_err().contains("got message 7"));
        assert!(m.check(7, false, &p).unwrap_err().contains("binary"));
        assert!(m.check(7, true, &p[..15]).unwrap_err().contains("15 bytes"));
        let mut q = p.clone();
        q[12] ^= 1;
        assert!(m.check(7, true, &q).unwrap_err().contains("differs"));
        q = p;
        q[0] = b'z';
        assert!(m.check(7, true, &q).unwrap_err().contains("corrupt"));
    }

    #[test]
    fn json_messages_are_valid_text_of_the_exact_size() {
        for size in [JSON_MIN_SIZE, 24, 64, 100, 1000, 16 * 1024] {
            let m = Messages::new(size, false, Payload::Json);
            for seq in [0u64, 1, 7, 8, 1 << 33] {
                let payload = m.make(seq);
                assert_eq!(payload.len(), size);
                let text = std::str::from_utf8(&payload).unwrap();
                let value: serde_json::Value = serde_json::from_str(text).unwrap();
                assert_eq!(value["h"], format!("{:08x}", seq as u32), "{text}");
                assert!(value["d"].is_array(), "{text}");
                assert_eq!(m.check(seq, false, &payload), Ok(()));
            }
        }
        // Big enough for records: the market-data objects are there.
        let m = Messages::new(1000, false, Payload::Json);
        let value: serde_json::Value = serde_json::from_slice(&m.make(3)).unwrap();
        assert_eq!(
            value["d"][0]["side"]
                .as_str()
                .map(|s| s == "buy" || s == "sell"),
            Some(true)
        );
    }

    #[test]
    fn corrupt_json_messages_are_refused() {
        let m = Messages::new(200, false, Payload::Json);
        let p = m.make(9);
        assert!(m.check(8, false, &p).unwrap_err().contains("got message 9"));
        assert!(m.check(9, true, &p).unwrap_err().contains("text"));
        assert!(
            m.check(9, false, &p[..199])
                .unwrap_err()
                .contains("199 bytes")
        );
        // A byte of a record, the frame around the array, the closing brace.
        for at in [100, 2, JSON_SEQ_AT + SEQ_BYTES + 1, 199] {
            let mut q = p.clone();
            q[at] ^= 1;
            assert!(
                m.check(9, false, &q).unwrap_err().contains("differs"),
                "byte {at}"
            );
        }
        let mut q = p.clone();
        q[JSON_SEQ_AT] = b'z';
        assert!(m.check(9, false, &q).unwrap_err().contains("corrupt"));
        // Another message's array (the next variant) under this one's header.
        let other = m.make(10);
        let mut q = p;
        q[JSON_SEQ_AT + SEQ_BYTES..].copy_from_slice(&other[JSON_SEQ_AT + SEQ_BYTES..]);
        assert!(m.check(9, false, &q).unwrap_err().contains("differs"));
    }

    #[test]
    fn options_are_checked() {
        let mut o = EchoOptions::new("ws://127.0.0.1:1/");
        assert!(o.validate().is_ok());
        o.size = 7;
        assert!(o.validate().is_err());
        o.size = JSON_MIN_SIZE;
        o.payload = Payload::Json;
        assert!(o.validate().is_ok());
        o.size = JSON_MIN_SIZE - 1;
        assert!(
            o.validate()
                .unwrap_err()
                .to_string()
                .contains("--payload json")
        );
        o = EchoOptions::new("ws://127.0.0.1:1/");
        o.duration = 0.0;
        assert!(o.validate().is_err());
        o.duration = f64::NAN;
        assert!(o.validate().is_err());
    }
}
