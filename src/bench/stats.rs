//! What the scenarios measure besides counts: latency percentiles from an HDR
//! histogram, CPU time of a process from `/proc/PID/stat`, resident memory from
//! `/proc/PID/status`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of durations in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .expect("constant histogram bounds are valid: low >= 1, high >= 2 * low, sigfig <= 5")
}

/// Records `d` in `hist`, clamped to its range.
pub(crate) fn record(hist: &mut Histogram<u64>, d: Duration) {
    hist.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// How many latencies were recorded.
    pub samples: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanoseconds.
    pub fn from_histogram(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Self {
            samples: hist.len(),
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.50)),
            p90: us(hist.value_at_quantile(0.90)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} samples)",
            micros(self.p50),
            micros(self.p90),
            micros(self.p99),
            micros(self.p999),
            micros(self.max),
            thousands(self.samples)
        )
    }
}

/// One point of a latency distribution: the latency below which `percentile` % of
/// the samples fall.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentile {
    /// 0 to 100.
    pub percentile: f64,
    /// Microseconds.
    pub us: f64,
}

/// The latency distribution of `hist` (nanoseconds) as percentiles in microseconds,
/// evenly spaced on the log scale of `1 / (1 - p)` that HdrHistogram plots use (ten
/// points a decade: 0 %, 20.6 %, 36.9 %, …, 90 %, …, 99 %, …), up to the point where
/// one sample remains, then the maximum at 100 %. Empty for an empty histogram.
pub fn percentile_curve(hist: &Histogram<u64>) -> Vec<Percentile> {
    if hist.is_empty() {
        return Vec::new();
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut curve = Vec::new();
    for step in 0..=70 {
        let tail = 10f64.powf(-f64::from(step) / 10.0);
        if tail * (hist.len() as f64) < 1.0 - 1e-9 {
            break;
        }
        let quantile = 1.0 - tail;
        curve.push(Percentile {
            percentile: quantile * 100.0,
            us: us(hist.value_at_quantile(quantile)),
        });
    }
    curve.push(Percentile {
        percentile: 100.0,
        us: us(hist.max()),
    });
    curve
}

/// CPU used by the server and by this load generator over a window, as a percentage
/// of one core (100 = one core busy all the time). The one near 100 × its cores is
/// the bottleneck.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CpuUsage {
    /// The length of the window, in seconds.
    pub window_secs: f64,
    /// The server's CPU time over the window, in seconds, when its pid was given.
    pub server_secs: Option<f64>,
    /// This process's CPU time over the window, in seconds.
    pub client_secs: Option<f64>,
    /// The server's CPU, when its pid was given.
    pub server_percent: Option<f64>,
    /// This process's CPU.
    pub client_percent: Option<f64>,
    /// How busy each core of the machine was, in percent, from `/proc/stat`: user,
    /// system, interrupt and softirq time (loopback TCP is processed in softirqs,
    /// which no process is charged for). Index = CPU number.
    pub cores_busy_percent: Vec<f64>,
}

impl fmt::Display for CpuUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |p: Option<f64>| p.map_or_else(|| "n/a".to_owned(), |p| format!("{p:.0} %"));
        write!(
            f,
            "server {}, load generator {} (100 % = one core)",
            pct(self.server_percent),
            pct(self.client_percent)
        )?;
        if !self.cores_busy_percent.is_empty() {
            f.write_str("; cores busy")?;
            for (cpu, busy) in self.cores_busy_percent.iter().enumerate() {
                write!(f, " cpu{cpu} {busy:.0} %")?;
            }
        }
        Ok(())
    }
}

impl CpuUsage {
    /// The CPU time per item (message, delivery) of the load generator and of the
    /// server, in microseconds, for `items` handled over the window.
    pub fn per_item_us(&self, items: u64) -> CpuPerItem {
        let per = |secs: Option<f64>| secs.filter(|_| items > 0).map(|s| s * 1e6 / items as f64);
        CpuPerItem {
            client_us: per(self.client_secs),
            server_us: per(self.server_secs),
        }
    }
}

/// CPU time per message (or delivery), in microseconds: the load generator's own cost,
/// beside the server's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuPerItem {
    /// This load generator (user + system time of the process).
    pub client_us: Option<f64>,
    /// The server, when its pid was given.
    pub server_us: Option<f64>,
}

impl fmt::Display for CpuPerItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2} µs"));
        write!(
            f,
            "load generator {}, server {}",
            us(self.client_us),
            us(self.server_us)
        )
    }
}

/// CPU times of the server, of this process and of every core at one instant.
#[derive(Debug, Clone)]
pub(crate) struct CpuSample {
    at: Instant,
    server: Option<Duration>,
    client: Option<Duration>,
    /// (busy, total) clock ticks of each core.
    cores: Vec<(u64, u64)>,
}

impl CpuSample {
    /// Samples now.
    pub fn take(server_pid: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server: server_pid.and_then(|pid| cpu_time(&pid.to_string())),
            client: cpu_time("self"),
            cores: core_ticks(),
        }
    }

    /// The usage between `self` and a later sample.
    pub fn usage_until(&self, later: &CpuSample) -> CpuUsage {
        let wall = later.at.saturating_duration_since(self.at).as_secs_f64();
        let secs = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        let (server_secs, client_secs) = (
            secs(self.server, later.server),
            secs(self.client, later.client),
        );
        let pct = |secs: Option<f64>| secs.filter(|_| wall > 0.0).map(|s| s / wall * 100.0);
        let cores_busy_percent = self
            .cores
            .iter()
            .zip(&later.cores)
            .map(|(&(busy0, total0), &(busy1, total1))| {
                let total = total1.saturating_sub(total0);
                if total == 0 {
                    0.0
                } else {
                    busy1.saturating_sub(busy0) as f64 * 100.0 / total as f64
                }
            })
            .collect();
        CpuUsage {
            window_secs: wall,
            server_secs,
            client_secs,
            server_percent: pct(server_secs),
            client_percent: pct(client_secs),
            cores_busy_percent,
        }
    }
}

/// (busy, total) clock ticks of each core from the `cpuN` lines of `/proc/stat`; idle
/// and iowait are the only ticks not busy. Empty when unreadable.
fn core_ticks() -> Vec<(u64, u64)> {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Vec::new();
    };
    stat.lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .map(|line| {
            let ticks: Vec<u64> = line
                .split_ascii_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            let total: u64 = ticks.iter().sum();
            let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
            (total - idle.min(total), total)
        })
        .collect()
}

/// User plus system CPU time of `/proc/{pid}/stat` (fields 14 and 15, in clock ticks).
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_ascii_whitespace();
    // `after` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value; it has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_nanos(
        (utime + stime) * 1_000_000_000 / ticks,
    ))
}

/// The resident set size of process `pid` in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Adds `n` to the count of `cause`.
pub(crate) fn count(causes: &mut BTreeMap<String, u64>, cause: String, n: u64) {
    *causes.entry(cause).or_insert(0) += n;
}

/// Adds every count of `from` to `into`.
pub(crate) fn merge_counts(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (cause, n) in from {
        count(into, cause, n);
    }
}

/// Writes `label n` and one line per cause, `k × cause`, indented under it.
pub(crate) fn write_causes(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    causes: &BTreeMap<String, u64>,
) -> fmt::Result {
    write!(f, "  {label:<12}{}", thousands(causes.values().sum()))?;
    for (cause, n) in causes {
        write!(f, "\n    {} × {cause}", thousands(*n))?;
    }
    Ok(())
}

/// Writes the line about closing handshakes that did not complete, if any did not.
pub(crate) fn write_close_failures(f: &mut fmt::Formatter<'_>, n: u64) -> fmt::Result {
    if n > 0 {
        write!(
            f,
            "\n  close       {n} connections did not complete the closing handshake"
        )?;
    }
    Ok(())
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds with one decimal below 100 and none above.
pub(crate) fn micros(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        thousands(us.round() as u64)
    }
}

/// Bytes per second in decimal units.
pub(crate) fn rate_bytes(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.2} GB/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB/s", b / 1e3),
        b => format!("{b:.0} B/s"),
    }
}

/// A byte count: `812 B`, `3.4 kB`, `12.1 MB`, `1.25 GB`.
pub(crate) fn bytes(n: u64) -> String {
    let b = n as f64;
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", b / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", b / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", b / 1e3),
        n => format!("{n} B"),
    }
}

/// What a report's first line adds after the URL: ` (TLS, permessage-deflate)`, or
/// nothing over plain TCP without compression.
pub(crate) fn transport(tls: bool, deflate: bool) -> &'static str {
    match (tls, deflate) {
        (false, false) => "",
        (true, false) => " (TLS)",
        (false, true) => " (permessage-deflate)",
        (true, true) => " (TLS, permessage-deflate)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.samples, 1000);
        assert!((s.p50 - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() < 1.0, "{s:?}");
        assert_eq!(
            LatencySummary::from_histogram(&new_histogram()),
            LatencySummary::default()
        );
    }

    #[test]
    fn curve_runs_from_the_minimum_to_the_maximum() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let curve = percentile_curve(&h);
        assert_eq!(curve.first().map(|p| p.percentile), Some(0.0));
        let last = curve.last().unwrap();
        assert_eq!(last.percentile, 100.0);
        assert!((last.us - 1000.0).abs() < 1.0, "{last:?}");
        // Ten points a decade while at least one sample is left: 0 … 99.9 %.
        assert_eq!(curve.len(), 31 + 1, "{curve:?}");
        assert!(
            curve
                .windows(2)
                .all(|w| w[0].percentile < w[1].percentile && w[0].us <= w[1].us)
        );
        assert!(percentile_curve(&new_histogram()).is_empty());
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).is_some_and(|kib| kib > 0));
        let a = CpuSample::take(Some(pid));
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let usage = a.usage_until(&CpuSample::take(Some(pid)));
        assert!(usage.server_percent.is_some() && usage.client_percent.is_some());
        assert!(!usage.cores_busy_percent.is_empty());
        assert!(
            usage
                .cores_busy_percent
                .iter()
                .all(|p| (0.0..=100.0).contains(p))
        );
        assert!(usage.to_string().contains("cpu0"), "{usage}");
    }

    #[test]
    fn formats_numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(micros(12.34), "12.3");
        let per = CpuUsage {
            client_secs: Some(0.5),
            ..CpuUsage::default()
        }
        .per_item_us(1_000_000);
        assert_eq!(per.client_us, Some(0.5));
        assert_eq!(per.server_us, None);
        assert_eq!(per.to_string(), "load generator 0.50 µs, server n/a");
        assert_eq!(micros(1234.4), "1,234");
        assert_eq!(rate_bytes(7.9e6), "7.9 MB/s");
    }
}
