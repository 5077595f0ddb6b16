//! `bench connect`: opens many WebSocket connections as fast as a cap on concurrent
//! handshakes allows, holds them idle, and measures handshakes per second and, given
//! the server's pid, its memory per idle connection.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::LocalSet;

use super::client::{self, Client};
use super::common::{CommonOptions, seconds};
use super::compare::{Figure, Summary};
use super::stats::{self, CpuSample, CpuUsage, LatencySummary, Percentile, thousands};
use super::target::Target;
use super::tls::Tls;
use super::{BenchError, Progress, join_worker, new_runtime};
use crate::proto::Event;

/// Options of `bench connect`; the defaults are those of the command line.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct ConnectOptions {
    /// WebSocket URL to connect to, e.g. ws://127.0.0.1:9001/echo or
    /// wss://localhost:9443/echo.
    pub url: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Connect-and-handshakes in progress at once, at most (over all threads).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// How long to hold the connections idle once all are open, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Threads, source addresses, timeout, server pid.
    #[command(flatten)]
    pub common: CommonOptions,
}

impl ConnectOptions {
    /// The command line's defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            conns: 1000,
            concurrency: 256,
            hold: 5.0,
            common: CommonOptions::default(),
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        self.common.validate()?;
        if self.conns == 0 || self.concurrency == 0 {
            return Err(BenchError::Options(
                "--conns and --concurrency must be at least 1".into(),
            ));
        }
        seconds("--hold", self.hold)
    }
}

/// What `bench connect` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectReport {
    /// The endpoint.
    pub url: String,
    /// Whether the connections spoke TLS (a wss:// URL, or --tls).
    pub tls: bool,
    /// Whether permessage-deflate was offered and the connections that opened
    /// negotiated it (--deflate; a connection whose server refused it failed).
    pub deflate: bool,
    /// Connections attempted.
    pub conns: usize,
    /// The cap on concurrent handshakes.
    pub concurrency: usize,
    /// Load generator threads.
    pub threads: usize,
    /// Connections opened (handshake completed).
    pub opened: u64,
    /// Connections that failed to open.
    pub failed: u64,
    /// Those failures by cause.
    pub failure_causes: BTreeMap<String, u64>,
    /// From the first connect to the last handshake's end, in seconds.
    pub open_secs: f64,
    /// `opened / open_secs`.
    pub handshakes_per_sec: f64,
    /// Connect plus handshake, per connection.
    pub handshake_latency_us: LatencySummary,
    /// Their distribution, for plots.
    pub handshake_latency_curve: Vec<Percentile>,
    /// CPU use while opening.
    pub cpu: CpuUsage,
    /// How long the connections were held, in seconds.
    pub hold_secs: f64,
    /// Connections that the server closed or lost during the hold.
    pub dropped: u64,
    /// Those by cause.
    pub drop_causes: BTreeMap<String, u64>,
    /// Connections whose closing handshake at the end did not complete.
    pub close_failures: u64,
    /// The server's memory, when its pid was given.
    pub memory: Option<Memory>,
}

/// The server's resident memory around the opening of the connections.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// VmRSS before the first connection, in KiB.
    pub rss_before_kib: u64,
    /// VmRSS once every connection was open, in KiB.
    pub rss_open_kib: u64,
    /// VmRSS at the end of the hold, in KiB.
    pub rss_held_kib: u64,
    /// `(rss_open - rss_before) / opened`, in bytes.
    pub bytes_per_conn: f64,
    /// `(rss_held - rss_before) / opened`, in bytes.
    pub bytes_per_conn_held: f64,
}

impl ConnectReport {
    /// Whether every connection opened and lived through the hold.
    pub fn is_clean(&self) -> bool {
        self.failed == 0 && self.dropped == 0
    }
}

impl Summary for ConnectReport {
    const MODE: &'static str = "connect";
    const LATENCY: &'static str = "connect-and-handshake";

    fn url(&self) -> &str {
        &self.url
    }

    fn figures(&self) -> Vec<Figure> {
        let l = &self.handshake_latency_us;
        vec![
            Figure::more("handshakes/s", self.handshakes_per_sec),
            Figure::less("handshake p50 µs", l.p50),
            Figure::less("handshake p99 µs", l.p99),
            Figure::less("failed", self.failed as f64),
            Figure::less("dropped", self.dropped as f64),
            Figure::less(
                "server RSS B/connection",
                self.memory.map(|m| m.bytes_per_conn),
            ),
            Figure::less("after the hold", self.memory.map(|m| m.bytes_per_conn_held)),
        ]
    }

    fn latency_curve(&self) -> &[Percentile] {
        &self.handshake_latency_curve
    }

    fn failure(&self) -> Option<String> {
        (!self.is_clean()).then(|| {
            format!(
                "{} connections failed to open and {} were dropped during the hold",
                self.failed, self.dropped
            )
        })
    }
}

impl fmt::Display for ConnectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "bench connect {}{}",
            self.url,
            stats::transport(self.tls, self.deflate)
        )?;
        writeln!(
            f,
            "  {} connections, at most {} handshakes at a time, {} thread(s); held {} s",
            thousands(self.conns as u64),
            self.concurrency,
            self.threads,
            self.hold_secs
        )?;
        writeln!(
            f,
            "  opened      {} in {:.2} s = {} handshakes/s",
            thousands(self.opened),
            self.open_secs,
            thousands(self.handshakes_per_sec.round() as u64)
        )?;
        writeln!(f, "  handshake   {}", self.handshake_latency_us)?;
        writeln!(f, "  cpu         {} while opening", self.cpu)?;
        if let Some(m) = &self.memory {
            writeln!(
                f,
                "  server RSS  {} KiB before, {} KiB open, {} KiB after the hold: {} B per connection ({} B after the hold)",
                thousands(m.rss_before_kib),
                thousands(m.rss_open_kib),
                thousands(m.rss_held_kib),
                thousands(m.bytes_per_conn.max(0.0).round() as u64),
                thousands(m.bytes_per_conn_held.max(0.0).round() as u64)
            )?;
        }
        stats::write_causes(f, "failed", &self.failure_causes)?;
        writeln!(f)?;
        stats::write_causes(f, "dropped", &self.drop_causes)?;
        stats::write_close_failures(f, self.close_failures)
    }
}

/// Runs `bench connect`. Fails when no connection at all could be opened; partial
/// failures are counted in the report.
pub fn connect(options: &ConnectOptions, progress: &Progress) -> Result<ConnectReport, BenchError> {
    options.validate()?;
    let target = Arc::new(Target::resolve(&options.url)?);
    let tls = Tls::for_run(&target, &options.common)?;
    let rss = |pid: u32| {
        stats::rss_kib(pid).ok_or_else(|| {
            BenchError::Options(format!(
                "--server-pid {pid}: cannot read VmRSS from /proc/{pid}/status"
            ))
        })
    };
    let rss_before = options.common.server_pid.map(rss).transpose()?;
    let threads = options.common.threads.min(options.conns);
    let per_thread_cap = options.concurrency.div_ceil(threads);
    let attempted = Arc::new(AtomicU64::new(0));
    let start_line = Arc::new(Barrier::new(threads + 1));
    let (release_tx, release_rx) = watch::channel(false);
    let (opened_tx, opened_rx) = mpsc::channel::<OpenStats>();
    let mut workers = Vec::with_capacity(threads);
    for thread in 0..threads {
        let job = Job {
            thread,
            threads,
            cap: per_thread_cap,
            options: options.clone(),
            target: target.clone(),
            tls: tls.clone(),
            attempted: attempted.clone(),
        };
        let start_line = start_line.clone();
        let release = release_rx.clone();
        let opened = opened_tx.clone();
        let worker = std::thread::Builder::new()
            .name(format!("bench-connect-{thread}"))
            .spawn(move || job.run(&start_line, opened, release))
            .map_err(|e| BenchError::Runtime(format!("cannot start a thread: {e}")))?;
        workers.push(worker);
    }
    drop(opened_tx);
    drop(release_rx);

    progress.set_length(options.conns as u64);
    start_line.wait();
    let start = Instant::now();
    let cpu_start = CpuSample::take(options.common.server_pid);
    let mut open = OpenStats::new();
    let mut reported = 0;
    while reported < threads {
        match opened_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(stats) => {
                open.merge(stats);
                reported += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        progress.position(attempted.load(Ordering::Relaxed));
    }
    let cpu = cpu_start.usage_until(&CpuSample::take(options.common.server_pid));
    let rss_open = options.common.server_pid.and_then(stats::rss_kib);
    let open_secs = open.finished.map_or(0.0, |end| {
        end.saturating_duration_since(start).as_secs_f64()
    });
    let opened = open.latency.len();
    let failed: u64 = open.failures.values().sum();
    if opened == 0 {
        let _ = release_tx.send(true);
        for worker in workers {
            let _ = join_worker(worker);
        }
        progress.finish();
        return Err(BenchError::Setup {
            failed,
            total: options.conns as u64,
            causes: open.failures,
        });
    }

    progress.message(format!(
        "holding {} connections for {} s",
        thousands(opened),
        options.hold
    ));
    let hold_end = Instant::now() + Duration::from_secs_f64(options.hold);
    progress.wait_until(hold_end, || {
        format!(
            "holding {} connections for {} s",
            thousands(opened),
            options.hold
        )
    });
    let rss_held = options.common.server_pid.and_then(stats::rss_kib);
    let _ = release_tx.send(true);
    progress.message("closing".to_owned());
    let mut held = HoldStats::default();
    for worker in workers {
        held.merge(join_worker(worker)?);
    }
    progress.finish();

    let memory = match (rss_before, rss_open, rss_held) {
        (Some(before), Some(open_kib), Some(held_kib)) => {
            let per = |kib: u64| (kib as f64 - before as f64) * 1024.0 / opened as f64;
            Some(Memory {
                rss_before_kib: before,
                rss_open_kib: open_kib,
                rss_held_kib: held_kib,
                bytes_per_conn: per(open_kib),
                bytes_per_conn_held: per(held_kib),
            })
        }
        _ => None,
    };
    Ok(ConnectReport {
        url: options.url.clone(),
        tls: tls.is_some(),
        deflate: options.common.deflate,
        conns: options.conns,
        concurrency: options.concurrency,
        threads,
        opened,
        failed,
        failure_causes: open.failures,
        open_secs,
        handshakes_per_sec: if open_secs > 0.0 {
            opened as f64 / open_secs
        } else {
            0.0
        },
        handshake_latency_us: LatencySummary::from_histogram(&open.latency),
        handshake_latency_curve: stats::percentile_curve(&open.latency),
        cpu,
        hold_secs: options.hold,
        dropped: held.drops.values().sum(),
        drop_causes: held.drops,
        close_failures: held.close_failures,
        memory,
    })
}

/// What one thread saw while opening its connections.
#[derive(Debug)]
struct OpenStats {
    /// Connect-plus-handshake times of the connections that opened.
    latency: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    /// When the thread's last attempt ended.
    finished: Option<Instant>,
}

impl OpenStats {
    fn new() -> Self {
        Self {
            latency: stats::new_histogram(),
            failures: BTreeMap::new(),
            finished: None,
        }
    }

    fn merge(&mut self, other: OpenStats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        stats::merge_counts(&mut self.failures, other.failures);
        self.finished = self.finished.max(other.finished);
    }
}

/// What one thread saw while holding and closing its connections.
#[derive(Debug, Default)]
struct HoldStats {
    drops: BTreeMap<String, u64>,
    close_failures: u64,
}

impl HoldStats {
    fn merge(&mut self, other: HoldStats) {
        stats::merge_counts(&mut self.drops, other.drops);
        self.close_failures += other.close_failures;
    }
}

/// One load generator thread and its share of the connections.
struct Job {
    thread: usize,
    threads: usize,
    cap: usize,
    options: ConnectOptions,
    target: Arc<Target>,
    /// The run's TLS settings, shared by every thread; `None` for plain TCP.
    tls: Option<Arc<Tls>>,
    attempted: Arc<AtomicU64>,
}

impl Job {
    fn run(
        self,
        start_line: &Barrier,
        opened: mpsc::Sender<OpenStats>,
        release: watch::Receiver<bool>,
    ) -> HoldStats {
        let runtime = new_runtime();
        start_line.wait();
        let runtime = match runtime {
            Ok(rt) => rt,
            Err(e) => {
                let mut stats = OpenStats::new();
                let count = self.indices().count() as u64;
                stats::count(
                    &mut stats.failures,
                    format!("cannot start a runtime: {e}"),
                    count,
                );
                let _ = opened.send(stats);
                return HoldStats::default();
            }
        };
        LocalSet::new().block_on(&runtime, self.open_hold_close(opened, release))
    }

    fn indices(&self) -> impl Iterator<Item = usize> + use<> {
        (self.thread..self.options.conns).step_by(self.threads)
    }

    async fn open_hold_close(
        &self,
        opened: mpsc::Sender<OpenStats>,
        release: watch::Receiver<bool>,
    ) -> HoldStats {
        let permits = Rc::new(Semaphore::new(self.cap));
        let open_stats = Rc::new(RefCell::new(OpenStats::new()));
        let hold_stats = Rc::new(RefCell::new(HoldStats::default()));
        let remaining = Rc::new(Cell::new(self.indices().count()));
        let all_attempted = Rc::new(Notify::new());
        if remaining.get() == 0 {
            all_attempted.notify_one();
        }
        let timeout = Duration::from_secs_f64(self.options.common.timeout);
        let handles: Vec<_> = self
            .indices()
            .map(|index| {
                let target = self.target.clone();
                let tls = self.tls.clone();
                let source = target.source_for(index, self.options.common.source_addrs);
                let permits = permits.clone();
                let open_stats = open_stats.clone();
                let hold_stats = hold_stats.clone();
                let remaining = remaining.clone();
                let all_attempted = all_attempted.clone();
                let attempted = self.attempted.clone();
                let mut release = release.clone();
                let deflate = self.options.common.deflate;
                tokio::task::spawn_local(async move {
                    let permit = permits.acquire().await;
                    let began = Instant::now();
                    let result =
                        client::open(&target, tls.as_deref(), deflate, source, timeout).await;
                    let ended = Instant::now();
                    drop(permit);
                    {
                        let mut stats = open_stats.borrow_mut();
                        match &result {
                            Ok(_) => stats::record(&mut stats.latency, ended - began),
                            Err(e) => stats::count(&mut stats.failures, e.to_string(), 1),
                        }
                        stats.finished = stats.finished.max(Some(ended));
                    }
                    attempted.fetch_add(1, Ordering::Relaxed);
                    remaining.set(remaining.get() - 1);
                    if remaining.get() == 0 {
                        all_attempted.notify_one();
                    }
                    let Ok(mut client) = result else {
                        return;
                    };
                    match hold(&mut client, &mut release).await {
                        Ok(()) => {
                            if !client.close(Duration::from_secs(5)).await {
                                hold_stats.borrow_mut().close_failures += 1;
                            }
                        }
                        Err(cause) => stats::count(&mut hold_stats.borrow_mut().drops, cause, 1),
                    }
                })
            })
            .collect();
        all_attempted.notified().await;
        let stats = std::mem::replace(&mut *open_stats.borrow_mut(), OpenStats::new());
        let _ = opened.send(stats);
        for handle in handles {
            if let Err(e) = handle.await {
                stats::count(
                    &mut hold_stats.borrow_mut().drops,
                    format!("connection task failed: {e}"),
                    1,
                );
            }
        }
        hold_stats.take()
    }
}

/// Keeps an open connection idle until `release`, answering the server's Pings.
async fn hold(client: &mut Client, release: &mut watch::Receiver<bool>) -> Result<(), String> {
    let mut buf = [0u8; 256];
    loop {
        if *release.borrow() {
            return Ok(());
        }
        tokio::select! {
            _ = release.changed() => return Ok(()),
            read = client.stream.read(&mut buf) => {
                let n = match read {
                    Ok(0) => {
                        return Err("closed by the server during the hold without a close frame (1006)".into());
                    }
                    Ok(n) => n,
                    Err(e) => return Err(format!("read failed during the hold: {e}")),
                };
                client.conn.handle_bytes(&buf[..n]);
                loop {
                    match client.conn.poll_event() {
                        Ok(Some(Event::Close(frame))) => {
                            let _ = client.flush().await;
                            return Err(match frame {
                                Some(frame) => format!("closed by the server during the hold with {}", frame.code),
                                None => "closed by the server during the hold with no status (1005)".into(),
                            });
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return Err(format!("protocol error from the server: {e}")),
                    }
                }
                if let Err(e) = client.flush().await {
                    return Err(format!("write failed during the hold: {e}"));
                }
            }
        }
    }
}
