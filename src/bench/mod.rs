//! `ringsocket bench`: a load generator that can measure any WebSocket server.
//!
//! It speaks WebSocket through the client role of the sans-IO core
//! ([`crate::proto::ClientRequest`], [`crate::proto::Connection::client`]) over plain
//! tokio TCP, so the frames it sends are those the conformance tests check. `bench
//! connect` and `bench echo` also speak TLS (a `wss://` URL, or `--tls`), through
//! tokio-rustls, trusting the CA of `--ca FILE` or, with `--insecure`, any
//! certificate; session resumption is off, so every handshake is a full one.
//! `--deflate` offers permessage-deflate (RFC 7692) in every mode and fails the run if
//! the server does not accept it; then the client compresses what it sends and inflates
//! what it gets ([`crate::proto::PerMessageDeflate`]). `--payload json` (echo,
//! broadcast) sends compressible JSON text instead of the default filler.
//!
//! Scenarios:
//!
//! - [`broadcast()`]: subscribers and publishers in one room; publishers send at a
//!   fixed rate or ramp up to the highest rate without loss; deliveries per second,
//!   publish-to-receipt latency, and every message accounted for at every subscriber
//!   (lost, duplicated, reordered).
//! - [`echo()`]: connections each keep a number of messages in flight to an echo
//!   endpoint; messages per second, bytes per second and round-trip latency
//!   percentiles over a measured window after a warm-up, every echo checked for
//!   content and order.
//! - [`connect()`]: open many connections as fast as a cap on concurrent handshakes
//!   allows, hold them idle; handshakes per second, failures by cause and, given the
//!   server's pid, its resident memory per connection.
//! - [`recover()`]: `ringsocket.v1` clients disconnect, miss publications and
//!   reconnect all at once, each resubscribing with `since`; the time until all are
//!   live again, per-client recovery times, the server's CPU over the wave, and every
//!   missed publication checked at every client (in order, no gap, no duplicate).
//!
//! Threading: `--threads N` starts N OS threads, each with a single-threaded tokio
//! runtime and every N-th connection, so that the load generator can be pinned to
//! cores like the server (`taskset -c 1 ringsocket bench … --threads 1`). Both
//! scenarios report the CPU use of the load generator and, given `--server-pid`, of
//! the server, so that a reader can see which one was the bottleneck.
//!
//! `--compare URL2 …` runs the same scenario against several servers in turn and
//! prints a table with ratios ([`Comparison`]); `--json` prints the reports as JSON;
//! `--plot FILE.svg` draws the latency distributions ([`svg()`]).
//!
//! Each is a library function as well as a command: the tests call them against a
//! server started in the same process.

mod broadcast;
mod client;
mod common;
mod compare;
mod connect;
mod echo;
mod payload;
mod plot;
mod recover;
mod stats;
mod target;
mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use broadcast::{
    BroadcastOptions, BroadcastReport, HEADER_BYTES, StepReport, SubUrlLatency, V1Subscribers,
    Verdict, broadcast,
};
pub use common::{CommonOptions, OutputOptions};
pub use compare::{ComparedFigure, Comparison, Figure, Run, Summary};
pub use connect::{ConnectOptions, ConnectReport, Memory, connect};
pub use echo::{EchoOptions, EchoReport, SEQ_BYTES, echo};
pub use payload::Payload;
pub use plot::{Curve, svg};
pub use recover::{Medians, RecoverOptions, RecoverReport, RoundReport, recover};
pub use stats::{CpuPerItem, CpuUsage, LatencySummary, Percentile, rss_kib};
pub use target::Target;

/// `ringsocket bench`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The scenario.
    #[command(subcommand)]
    pub mode: BenchMode,
}

/// The scenarios of `ringsocket bench`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchMode {
    /// Messages in flight on many connections to an echo endpoint: messages/s,
    /// bytes/s and round-trip latency percentiles; every echo is checked.
    Echo {
        #[command(flatten)]
        options: EchoOptions,
        #[command(flatten)]
        output: OutputOptions,
    },
    /// Subscribers and publishers in one room: publishers send at a fixed rate (or
    /// ramp up to the highest rate without loss); deliveries/s, publish-to-receipt
    /// latency, lost, duplicated and reordered messages.
    Broadcast {
        #[command(flatten)]
        options: BroadcastOptions,
        #[command(flatten)]
        output: OutputOptions,
    },
    /// Open many connections and hold them idle: handshakes/s, failures by cause and
    /// the server's memory per connection (with --server-pid).
    Connect {
        #[command(flatten)]
        options: ConnectOptions,
        #[command(flatten)]
        output: OutputOptions,
    },
    /// ringsocket.v1 clients (on /v1) miss --missed publications and reconnect all at
    /// once with `since`: the time until all are live again, per-client recovery times,
    /// the server's CPU over the wave (with --server-pid); every missed publication is
    /// checked at every client (recovered: true, in order, no gap, no duplicate).
    Recover {
        #[command(flatten)]
        options: RecoverOptions,
        #[command(flatten)]
        output: OutputOptions,
    },
}

/// Runs `ringsocket bench`, printing the report (or, with `--compare`, every report
/// and the table) to stdout. An error when the bench could not run, or when it ran and
/// saw failures (after printing the report).
pub fn run(args: BenchArgs) -> Result<(), String> {
    match args.mode {
        BenchMode::Echo { options, output } => {
            let run = |url: &str, pid: Option<u32>, progress: &Progress| {
                let mut options = options.clone();
                url.clone_into(&mut options.url);
                options.common.server_pid = pid;
                echo(&options, progress)
            };
            run_mode(&options.url, options.common.server_pid, &output, run)
        }
        BenchMode::Broadcast { options, output } => {
            let run = |url: &str, pid: Option<u32>, progress: &Progress| {
                let mut options = options.clone();
                url.clone_into(&mut options.url);
                options.common.server_pid = pid;
                broadcast(&options, progress)
            };
            run_mode(&options.url, options.common.server_pid, &output, run)
        }
        BenchMode::Connect { options, output } => {
            let run = |url: &str, pid: Option<u32>, progress: &Progress| {
                let mut options = options.clone();
                url.clone_into(&mut options.url);
                options.common.server_pid = pid;
                connect(&options, progress)
            };
            run_mode(&options.url, options.common.server_pid, &output, run)
        }
        BenchMode::Recover { options, output } => {
            let run = |url: &str, pid: Option<u32>, progress: &Progress| {
                let mut options = options.clone();
                url.clone_into(&mut options.url);
                options.common.server_pid = pid;
                recover(&options, progress)
            };
            run_mode(&options.url, options.common.server_pid, &output, run)
        }
    }
}

/// Runs one scenario against `url` and every `--compare` URL in turn, and prints,
/// plots and judges the results.
fn run_mode<R: Summary>(
    url: &str,
    server_pid: Option<u32>,
    output: &OutputOptions,
    run: impl Fn(&str, Option<u32>, &Progress) -> Result<R, BenchError>,
) -> Result<(), String> {
    if !output.compare_pids.is_empty() && output.compare_pids.len() != output.compare.len() {
        return Err(format!(
            "--compare-pids: {} pids for {} --compare URLs; give one per URL, in order",
            output.compare_pids.len(),
            output.compare.len()
        ));
    }
    let progress = || {
        if !output.json && std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Progress::terminal()
        } else {
            Progress::hidden()
        }
    };
    if output.compare.is_empty() {
        let report = run(url, server_pid, &progress()).map_err(|e| e.to_string())?;
        print(&report, output.json)?;
        if let Some(path) = &output.plot {
            let curve = Curve {
                label: report.url(),
                points: report.latency_curve(),
            };
            plot::write_svg(path, &plot_title::<R>(), &[curve])?;
        }
        return report.failure().map_or(Ok(()), Err);
    }
    let urls = std::iter::once(url).chain(output.compare.iter().map(String::as_str));
    let pids = std::iter::once(server_pid)
        .chain((0..output.compare.len()).map(|i| output.compare_pids.get(i).copied()));
    let mut runs = Vec::new();
    for (i, (url, pid)) in urls.zip(pids).enumerate() {
        let progress = progress();
        progress.message(format!("[{}] {url}", i + 1));
        let run = match run(url, pid, &progress) {
            Ok(report) => {
                if !output.json {
                    println!("[{}] {report}\n", i + 1);
                }
                Run {
                    url: url.to_owned(),
                    error: report.failure(),
                    report: Some(report),
                }
            }
            Err(e) => Run {
                url: url.to_owned(),
                report: None,
                error: Some(e.to_string()),
            },
        };
        runs.push(run);
    }
    let comparison = Comparison::new(runs);
    print(&comparison, output.json)?;
    if let Some(path) = &output.plot {
        let curves: Vec<Curve<'_>> = comparison
            .runs
            .iter()
            .filter_map(|run| {
                run.report.as_ref().map(|report| Curve {
                    label: &run.url,
                    points: report.latency_curve(),
                })
            })
            .collect();
        plot::write_svg(path, &plot_title::<R>(), &curves)?;
    }
    comparison.failure().map_or(Ok(()), Err)
}

fn plot_title<R: Summary>() -> String {
    format!("ringsocket bench {}: {} latency", R::MODE, R::LATENCY)
}

fn print<R: serde::Serialize + fmt::Display>(report: &R, json: bool) -> Result<(), String> {
    if json {
        let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        println!("{report}");
    }
    Ok(())
}

/// Why a bench could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BenchError {
    /// The options are inconsistent.
    Options(String),
    /// The URL cannot be used.
    Url(String),
    /// Connections could not be opened: how many of how many, and why.
    Setup {
        /// Connections that failed.
        failed: u64,
        /// Connections attempted.
        total: u64,
        /// Failures by cause, e.g. `cannot connect to …: Connection refused`.
        causes: BTreeMap<String, u64>,
    },
    /// A thread or runtime could not be started, or a thread died.
    Runtime(String),
    /// The server does not behave as the scenario needs (e.g. `bench broadcast`
    /// against a URL that is not a room).
    Scenario(String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Options(why) | Self::Url(why) | Self::Runtime(why) | Self::Scenario(why) => {
                f.write_str(why)
            }
            Self::Setup {
                failed,
                total,
                causes,
            } => {
                write!(f, "{failed} of {total} connections could not be opened")?;
                for (cause, n) in causes {
                    write!(f, "\n  {n} × {cause}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for BenchError {}

/// Progress on the terminal: a spinner or bar with a message, or nothing.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Shows nothing (for tests, `--json` and output that is not a terminal).
    pub fn hidden() -> Self {
        Self { bar: None }
    }

    /// A spinner on stderr.
    pub fn terminal() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar: Some(bar) }
    }

    fn message(&self, text: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(text);
        }
    }

    /// Turns the spinner into a bar counting to `len`.
    fn set_length(&self, len: u64) {
        if let Some(bar) = &self.bar {
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_length(len);
        }
    }

    fn position(&self, pos: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
        }
    }

    /// Sleeps until `deadline`, refreshing the message from `text` a few times a second.
    fn wait_until(&self, deadline: Instant, text: impl Fn() -> String) {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let step = if self.bar.is_some() {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(3600)
            };
            std::thread::sleep(step.min(deadline - now));
            self.message(text());
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A load generator thread's runtime: single-threaded, with I/O and timers.
fn new_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn join_worker<T>(worker: JoinHandle<T>) -> Result<T, BenchError> {
    worker
        .join()
        .map_err(|_| BenchError::Runtime("a load generator thread panicked".into()))
}
