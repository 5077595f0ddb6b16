//! `bench broadcast`: subscribers and publishers in one room; every message a
//! publisher sends must reach every subscriber once and in order.
//!
//! The room is a URL on which every message a client sends goes to every other client
//! connected to it (the sender excluded): ringsocket's `/broadcast` and `/ws/{room}`,
//! the peers `tt-broadcast` and `bun/broadcast.js`. Publishers are members of the room
//! too; they read and discard what they get, and are not counted as receivers.
//!
//! A message is binary, `--size` bytes, and starts with [`HEADER_BYTES`] bytes, all
//! little-endian: publisher id (u32), step (u32, 0 for the readiness probe), sequence
//! number (u64, from 0 in each step) and the time it was due to be sent (u64, in
//! nanoseconds since the bench started, on this process's monotonic clock); zeros pad
//! it to `--size`. Publisher `p` of `P` sends message `k` of a step at
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

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::LocalSet;

use super::client::{self, Client};
use super::common::{CommonOptions, seconds, window};
use super::compare::{Figure, Summary};
use super::stats::{
    self, CpuPerItem, CpuSample, CpuUsage, LatencySummary, Percentile, micros, thousands,
};
use super::target::Target;
use super::{BenchError, Progress, join_worker, new_runtime};
use crate::proto::{CloseCode, Event};

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
    /// Bytes per (binary) message, at least 24: publisher, step, sequence number and
    /// send time.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
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
            rate: 100.0,
            ramp: false,
            duration: 10.0,
            warmup: 2.0,
            grace: 2.0,
            max_p99_ms: 500.0,
            max_steps: 16,
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
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("--rate must be a number of messages per second above 0".into());
        }
        if !(self.max_p99_ms.is_finite() && self.max_p99_ms > 0.0) {
            return bad("--max-p99-ms must be above 0".into());
        }
        seconds("--grace", self.grace)?;
        window(self.warmup, self.duration)
    }
}

/// What `bench broadcast` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BroadcastReport {
    /// The room.
    pub url: String,
    /// Subscriber connections.
    pub subs: usize,
    /// Publisher connections.
    pub pubs: usize,
    /// Bytes per message.
    pub size: usize,
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
        writeln!(f, "bench broadcast {}", self.url)?;
        writeln!(
            f,
            "  {} subscribers, {} publisher(s), {} B binary messages, {} thread(s); {}{} s warm-up, {} s measured, {} s grace",
            thousands(self.subs as u64),
            self.pubs,
            self.size,
            self.threads,
            if self.ramp { "steps of " } else { "" },
            self.warmup_secs,
            self.duration_secs,
            self.grace_secs
        )?;
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
    let target = Arc::new(Target::resolve(&options.url)?);
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
            target: target.clone(),
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
                 connection?",
                options.url,
                options.common.timeout,
                options.subs as u64 - ready,
                options.subs
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
        subs: options.subs,
        pubs: options.pubs,
        size: options.size,
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
    let expected = total * options.subs as u64;
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

/// One message's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    publisher: u32,
    step: u32,
    seq: u64,
    sent_ns: u64,
}

impl Header {
    fn encode(&self, size: usize) -> Bytes {
        let mut out = BytesMut::zeroed(size.max(HEADER_BYTES));
        out[0..4].copy_from_slice(&self.publisher.to_le_bytes());
        out[4..8].copy_from_slice(&self.step.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_le_bytes());
        out.freeze()
    }

    fn decode(payload: &[u8]) -> Option<Self> {
        let field = |range: Range<usize>| payload.get(range);
        let u32_at = |at: usize| {
            field(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let u64_at = |at: usize| {
            field(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        Some(Self {
            publisher: u32_at(0)?,
            step: u32_at(4)?,
            seq: u64_at(8)?,
            sent_ns: u64_at(16)?,
        })
    }
}

/// One subscriber's view of one publisher in the current step.
#[derive(Debug, Clone, Default)]
struct Track {
    step: u32,
    /// The next sequence number expected.
    next: u64,
    /// Sequence numbers below `next` not received yet.
    gaps: Vec<Range<u64>>,
}

/// What happened to a received sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    InOrder,
    Reordered,
    Duplicate,
}

impl Track {
    fn arrive(&mut self, step: u32, seq: u64) -> Arrival {
        if self.step != step {
            *self = Self {
                step,
                ..Self::default()
            };
        }
        if seq >= self.next {
            if seq > self.next {
                self.gaps.push(self.next..seq);
            }
            self.next = seq + 1;
            return Arrival::InOrder;
        }
        let Some(i) = self.gaps.iter().position(|g| g.contains(&seq)) else {
            return Arrival::Duplicate;
        };
        let gap = self.gaps.swap_remove(i);
        if gap.start < seq {
            self.gaps.push(gap.start..seq);
        }
        if seq + 1 < gap.end {
            self.gaps.push(seq + 1..gap.end);
        }
        Arrival::Reordered
    }

    /// Messages of `step` not received, of `published` sent.
    fn missing(&self, step: u32, published: u64) -> u64 {
        if self.step != step {
            return published;
        }
        let gaps: u64 = self
            .gaps
            .iter()
            .map(|g| g.end.min(published).saturating_sub(g.start))
            .sum();
        gaps + published.saturating_sub(self.next)
    }
}

/// A step's counts on one thread (or, merged, on all).
#[derive(Debug)]
struct StepStats {
    latency: Histogram<u64>,
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

/// A thread's subscribers' tracks and its counts, shared by its tasks.
#[derive(Debug)]
struct ThreadState {
    pubs: usize,
    size: usize,
    /// `tracks[sub * pubs + publisher]`.
    tracks: Vec<Track>,
    /// Per subscriber: publishers heard during the probe.
    heard: Vec<Vec<bool>>,
    /// The step `stats` belong to.
    stats_step: u32,
    stats: StepStats,
    errors: BTreeMap<String, u64>,
    close_failures: u64,
}

impl ThreadState {
    fn new(subs: usize, pubs: usize, size: usize) -> Self {
        Self {
            pubs,
            size,
            tracks: vec![Track::default(); subs * pubs],
            heard: vec![vec![false; pubs]; subs],
            stats_step: 0,
            stats: StepStats::new(),
            errors: BTreeMap::new(),
            close_failures: 0,
        }
    }

    fn stats_for(&mut self, step: u32) -> &mut StepStats {
        if self.stats_step != step {
            self.stats_step = step;
            self.stats = StepStats::new();
        }
        &mut self.stats
    }

    fn malformed(&mut self, step: u32, why: String) {
        let stats = self.stats_for(step);
        stats.malformed += 1;
        stats.first_malformed.get_or_insert(why);
    }

    /// Accounts for one message received by subscriber `sub` at `now`; returns
    /// whether it was a new delivery of the current step.
    fn receive(
        &mut self,
        sub: usize,
        payload: &[u8],
        now: Instant,
        phase: &Phase,
        shared: &Shared,
    ) -> bool {
        let current = match phase {
            Phase::Step(plan) => plan.step,
            Phase::Collect { plan, .. } => plan.step,
            _ => 0,
        };
        let Some(header) = Header::decode(payload) else {
            self.malformed(
                current,
                format!("a {} B message, shorter than the header", payload.len()),
            );
            return false;
        };
        let publisher = header.publisher as usize;
        if publisher >= self.pubs {
            self.malformed(
                current,
                format!("a message from publisher {publisher}, of {}", self.pubs),
            );
            return false;
        }
        if payload.len() != self.size {
            self.malformed(
                current,
                format!("a {} B message instead of {}", payload.len(), self.size),
            );
            return false;
        }
        let plan = match phase {
            Phase::Probe if header.step == 0 => {
                let heard = &mut self.heard[sub];
                if !heard[publisher] {
                    heard[publisher] = true;
                    if heard.iter().all(|h| *h) {
                        shared.ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return false;
            }
            Phase::Step(plan) if header.step == plan.step => plan,
            _ => {
                self.stats_for(current).stale += 1;
                return false;
            }
        };
        let arrival = self.tracks[sub * self.pubs + publisher].arrive(plan.step, header.seq);
        let stats = self.stats_for(plan.step);
        match arrival {
            Arrival::Duplicate => {
                stats.duplicated += 1;
                return false;
            }
            Arrival::Reordered => stats.reordered += 1,
            Arrival::InOrder => {}
        }
        stats.delivered += 1;
        if now >= plan.warm_end && now < plan.end {
            stats.window_deliveries += 1;
            let latency = shared.nanos_since_base(now).saturating_sub(header.sent_ns);
            stats::record(&mut stats.latency, Duration::from_nanos(latency));
        }
        true
    }

    /// The step's counts, with the messages each subscriber is missing.
    fn collect(&mut self, plan: &Plan, published: &[u64]) -> Collected {
        let mut lost = 0;
        for (i, track) in self.tracks.iter().enumerate() {
            let sent = published.get(i % self.pubs).copied().unwrap_or(0);
            lost += track.missing(plan.step, sent);
        }
        let mut stats = std::mem::replace(self.stats_for(plan.step), StepStats::new());
        stats.lost = lost;
        Collected {
            stats,
            failures: self.errors.values().sum(),
        }
    }

    fn fail(&mut self, cause: String) {
        stats::count(&mut self.errors, cause, 1);
    }
}

/// One load generator thread: its runtime, its share of the connections.
struct Job {
    thread: usize,
    threads: usize,
    options: BroadcastOptions,
    target: Arc<Target>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
}

/// A connection's part.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// Subscriber with this index among the thread's subscribers.
    Subscriber(usize),
    /// Publisher with this id.
    Publisher(u32),
}

impl Job {
    fn run(
        self,
        ready: mpsc::Sender<BTreeMap<String, u64>>,
        collect: mpsc::Sender<Collected>,
    ) -> ThreadEnd {
        let mut failures = BTreeMap::new();
        let runtime = match new_runtime() {
            Ok(rt) => rt,
            Err(e) => {
                failures.insert(format!("cannot start a runtime: {e}"), 1);
                let _ = ready.send(failures);
                return ThreadEnd::default();
            }
        };
        let local = LocalSet::new();
        let opened = local.block_on(&runtime, self.open_all());
        let mut clients = Vec::with_capacity(opened.len());
        for (role, result) in opened {
            match result {
                Ok(client) => clients.push((role, client)),
                Err(cause) => stats::count(&mut failures, cause, 1),
            }
        }
        let _ = ready.send(failures);
        local.block_on(&runtime, self.run_all(clients, collect))
    }

    /// Subscribers are connections `0..subs`, publishers `subs..subs + pubs`; this
    /// thread has every `threads`-th one.
    fn roles(&self) -> impl Iterator<Item = (usize, Role)> + use<> {
        let subs = self.options.subs;
        let mut local_subs = 0;
        (self.thread..subs + self.options.pubs)
            .step_by(self.threads)
            .map(move |index| {
                let role = if index < subs {
                    local_subs += 1;
                    Role::Subscriber(local_subs - 1)
                } else {
                    Role::Publisher((index - subs) as u32)
                };
                (index, role)
            })
    }

    /// Opens this thread's connections, at most 256 handshakes at a time.
    async fn open_all(&self) -> Vec<(Role, Result<Client, String>)> {
        let permits = Rc::new(Semaphore::new(256));
        let timeout = self.options.common.timeout();
        let handles: Vec<_> = self
            .roles()
            .map(|(index, role)| {
                let target = self.target.clone();
                let permits = permits.clone();
                let source = target.source_for(index, self.options.common.source_addrs);
                let task = tokio::task::spawn_local(async move {
                    let _permit = permits.acquire().await;
                    client::open(&target, source, timeout)
                        .await
                        .map_err(|e| e.to_string())
                });
                (role, task)
            })
            .collect();
        let mut out = Vec::with_capacity(handles.len());
        for (role, handle) in handles {
            let result = handle
                .await
                .unwrap_or_else(|e| Err(format!("connection task failed: {e}")));
            out.push((role, result));
        }
        out
    }

    async fn run_all(
        &self,
        clients: Vec<(Role, Client)>,
        collect: mpsc::Sender<Collected>,
    ) -> ThreadEnd {
        let subs = clients
            .iter()
            .filter(|(role, _)| matches!(role, Role::Subscriber(_)))
            .count();
        let state = Rc::new(RefCell::new(ThreadState::new(
            subs,
            self.options.pubs,
            self.options.size,
        )));
        // One read buffer for all the thread's subscribers: they read only when ready.
        let buf = Rc::new(RefCell::new(vec![0u8; 64 * 1024]));
        let handles: Vec<_> = clients
            .into_iter()
            .map(|(role, client)| {
                let state = state.clone();
                let shared = self.shared.clone();
                let phase = self.phase.clone();
                match role {
                    Role::Subscriber(sub) => tokio::task::spawn_local(subscribe(
                        client,
                        sub,
                        state,
                        shared,
                        phase,
                        buf.clone(),
                    )),
                    Role::Publisher(id) => tokio::task::spawn_local(publish(
                        client,
                        id,
                        self.options.size,
                        state,
                        shared,
                        phase,
                    )),
                }
            })
            .collect();
        let mut phase = self.phase.clone();
        loop {
            let current = phase.borrow_and_update().clone();
            match current {
                Phase::Collect { plan, published } => {
                    let collected = state.borrow_mut().collect(&plan, &published);
                    let _ = collect.send(collected);
                }
                Phase::Stop => break,
                Phase::Idle | Phase::Probe | Phase::Step(_) => {}
            }
            if phase.changed().await.is_err() {
                break;
            }
        }
        for handle in handles {
            if let Err(e) = handle.await {
                state
                    .borrow_mut()
                    .fail(format!("connection task failed: {e}"));
            }
        }
        let mut state = state.borrow_mut();
        ThreadEnd {
            errors: std::mem::take(&mut state.errors),
            close_failures: state.close_failures,
        }
    }
}

/// A subscriber: reads until told to stop, accounting for every message.
async fn subscribe(
    mut client: Client,
    sub: usize,
    state: Rc<RefCell<ThreadState>>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
    buf: Rc<RefCell<Vec<u8>>>,
) {
    let mut current = phase.borrow_and_update().clone();
    loop {
        if matches!(current, Phase::Stop) {
            if !client.close(Duration::from_secs(2)).await {
                state.borrow_mut().close_failures += 1;
            }
            return;
        }
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    return;
                }
                current = phase.borrow_and_update().clone();
            }
            readable = client.stream.readable() => {
                if let Err(e) = readable {
                    state.borrow_mut().fail(format!("read failed: {e}"));
                    return;
                }
                if phase.has_changed().unwrap_or(false) {
                    current = phase.borrow_and_update().clone();
                }
                match receive(&mut client, sub, &state, &shared, &current, &buf) {
                    Ok(()) => {}
                    Err(None) => continue,
                    Err(Some(cause)) => {
                        let _ = client.flush().await;
                        state.borrow_mut().fail(cause);
                        return;
                    }
                }
                if let Err(e) = client.flush().await {
                    state.borrow_mut().fail(format!("write failed: {e}"));
                    return;
                }
            }
        }
    }
}

/// Reads what a ready subscriber has and accounts for every message in it. `Err(None)`:
/// nothing to read after all; `Err(Some(cause))`: the connection failed.
fn receive(
    client: &mut Client,
    sub: usize,
    state: &RefCell<ThreadState>,
    shared: &Shared,
    phase: &Phase,
    buf: &RefCell<Vec<u8>>,
) -> Result<(), Option<String>> {
    let mut buf = buf.borrow_mut();
    let n = match client.stream.try_read(&mut buf) {
        Ok(0) => {
            return Err(Some(
                "closed by the server without a close frame (1006)".into(),
            ));
        }
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(None),
        Err(e) => return Err(Some(format!("read failed: {e}"))),
    };
    let now = Instant::now();
    client.conn.handle_bytes(&buf[..n]);
    drop(buf);
    let mut state = state.borrow_mut();
    let (mut received, mut delivered) = (0, 0);
    let result = loop {
        let payload = match client.conn.poll_event() {
            Ok(Some(Event::Binary(bytes))) => bytes,
            Ok(Some(Event::Text(text))) => text.into_bytes(),
            Ok(Some(Event::Close(frame))) => break Err(Some(closed_by_server(frame))),
            Ok(Some(_)) => continue,
            Ok(None) => break Ok(()),
            Err(e) => break Err(Some(format!("protocol error from the server: {e}"))),
        };
        received += 1;
        if state.receive(sub, &payload, now, phase, shared) {
            delivered += 1;
        }
    };
    shared.received.fetch_add(received, Ordering::Relaxed);
    shared.delivered.fetch_add(delivered, Ordering::Relaxed);
    result
}

fn closed_by_server(frame: Option<crate::proto::CloseFrame>) -> String {
    match frame {
        Some(frame) if frame.reason.is_empty() => {
            format!("closed early by the server with {}", frame.code)
        }
        Some(frame) => format!(
            "closed early by the server with {} ({})",
            frame.code, frame.reason
        ),
        None => "closed early by the server with no status (1005)".to_owned(),
    }
}

/// A publisher: sends probes, then each step's messages on schedule, while reading
/// (and discarding) what the room sends it.
async fn publish(
    client: Client,
    id: u32,
    size: usize,
    state: Rc<RefCell<ThreadState>>,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
) {
    let Client { mut stream, conn } = client;
    let conn = RefCell::new(conn);
    let wake = Notify::new();
    let stopping = Cell::new(false);
    let (mut rd, mut wr) = stream.split();
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) => {
                    return Some("closed by the server without a close frame (1006)".to_owned());
                }
                Ok(n) => n,
                Err(e) => return Some(format!("read failed: {e}")),
            };
            let mut conn = conn.borrow_mut();
            conn.handle_bytes(&buf[..n]);
            loop {
                match conn.poll_event() {
                    Ok(Some(Event::Close(frame))) => return Some(closed_by_server(frame)),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => return Some(format!("protocol error from the server: {e}")),
                }
            }
            if conn.pending_output() > 0 {
                wake.notify_one();
            }
        }
    };
    let writer = async {
        let mut phase = phase;
        let mut chunks = Vec::new();
        let mut probe_seq = 0u64;
        let mut step_sent: Option<(u32, u64)> = None;
        let mut done_step = None;
        loop {
            let current = phase.borrow_and_update().clone();
            let mut next_wake = None;
            let mut write_deadline = None;
            match &current {
                Phase::Idle | Phase::Collect { .. } => {}
                Phase::Stop => {
                    stopping.set(true);
                    let _ = conn.borrow_mut().close(CloseCode::Normal, "");
                    conn.borrow_mut().drain_transmit(&mut chunks);
                    for chunk in chunks.drain(..) {
                        let _ = wr.write_all(&chunk).await;
                    }
                    return None;
                }
                Phase::Probe => {
                    let header = Header {
                        publisher: id,
                        step: 0,
                        seq: probe_seq,
                        sent_ns: shared.nanos_since_base(Instant::now()),
                    };
                    probe_seq += 1;
                    if let Err(e) = conn.borrow_mut().send_binary(header.encode(size)) {
                        return Some(format!("cannot send: {e}"));
                    }
                    next_wake = Some(Instant::now() + Duration::from_millis(20));
                }
                Phase::Step(plan) => {
                    let sent = match step_sent {
                        Some((step, sent)) if step == plan.step => sent,
                        _ => 0,
                    };
                    let due = plan.due(Instant::now());
                    {
                        let mut conn = conn.borrow_mut();
                        for seq in sent..due {
                            let header = Header {
                                publisher: id,
                                step: plan.step,
                                seq,
                                sent_ns: shared.nanos_since_base(plan.due_at(seq)),
                            };
                            if let Err(e) = conn.send_binary(header.encode(size)) {
                                return Some(format!("cannot send: {e}"));
                            }
                        }
                    }
                    step_sent = Some((plan.step, due));
                    write_deadline = Some(plan.end + plan.grace);
                    if due < plan.total() {
                        next_wake = Some(plan.due_at(due));
                    }
                }
            }
            conn.borrow_mut().drain_transmit(&mut chunks);
            for chunk in chunks.drain(..) {
                let write = wr.write_all(&chunk);
                let written = match write_deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline.into(), write).await {
                        Ok(result) => result,
                        Err(_) => {
                            return Some(
                                "a publisher's write was still blocked at the end of the \
                                     grace period: the server stopped reading"
                                    .to_owned(),
                            );
                        }
                    },
                    None => write.await,
                };
                if let Err(e) = written {
                    return Some(format!("write failed: {e}"));
                }
            }
            if let (Phase::Step(plan), Some((step, sent))) = (&current, step_sent) {
                shared.published[id as usize].store(sent, Ordering::Relaxed);
                if sent == plan.total() && done_step != Some(step) {
                    done_step = Some(step);
                    shared.pubs_done.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = wake.notified() => {}
                () = sleep_until(next_wake) => {}
            }
        }
    };
    let failure = tokio::select! {
        failure = reader => failure,
        failure = writer => failure,
    };
    // A reader that ends because the bench is stopping is not a failure.
    if let Some(cause) = failure.filter(|_| !stopping.get()) {
        state.borrow_mut().fail(cause);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_short_payloads_are_refused() {
        let h = Header {
            publisher: 3,
            step: 7,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        let bytes = h.encode(64);
        assert_eq!(bytes.len(), 64);
        assert!(bytes[HEADER_BYTES..].iter().all(|b| *b == 0));
        assert_eq!(Header::decode(&bytes), Some(h));
        assert_eq!(Header::decode(&bytes[..HEADER_BYTES - 1]), None);
    }

    #[test]
    fn tracks_gaps_reorders_and_duplicates() {
        let mut t = Track::default();
        assert_eq!(t.arrive(1, 0), Arrival::InOrder);
        assert_eq!(t.arrive(1, 3), Arrival::InOrder); // gap 1..3
        assert_eq!(t.arrive(1, 2), Arrival::Reordered); // gap 1..2 left
        assert_eq!(t.arrive(1, 2), Arrival::Duplicate);
        assert_eq!(t.arrive(1, 0), Arrival::Duplicate);
        assert_eq!(t.arrive(1, 6), Arrival::InOrder); // gaps 1..2, 4..6
        assert_eq!(t.arrive(1, 4), Arrival::Reordered); // gaps 1..2, 5..6
        // Published 9: missing 1, 5 and 7, 8 never came.
        assert_eq!(t.missing(1, 9), 4);
        // Another step: everything of it is missing until it arrives.
        assert_eq!(t.missing(2, 5), 5);
        assert_eq!(t.arrive(2, 0), Arrival::InOrder);
        assert_eq!(t.missing(2, 1), 0);
    }

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
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.rate = 0.0;
        assert!(o.validate().is_err());
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.grace = -1.0;
        assert!(o.validate().is_err());
        o = BroadcastOptions::new("ws://127.0.0.1:1/broadcast");
        o.common.threads = 0;
        assert!(o.validate().is_err());
    }
}
