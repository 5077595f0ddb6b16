//! The standard process metrics (`process_cpu_seconds_total`, memory, descriptors,
//! start time), read from `/proc` at scrape time. Linux only; a value that cannot be
//! read or parsed leaves its sample out.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::gauge;

/// Reads `/proc/self` on each scrape. Its names carry no `ringsocket_` prefix: register
/// it on the registry's root (as [`super::Metrics::registry`] does).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stat = read("/proc/self/stat")
            .as_deref()
            .map(Stat::parse)
            .unwrap_or_default();
        let ticks = sysconf(libc::_SC_CLK_TCK);
        let page = sysconf(libc::_SC_PAGESIZE);
        let seconds = Unit::Seconds;
        let bytes = Unit::Bytes;
        let e = &mut encoder;
        if let (Some(cpu), Some(hz)) = (stat.cpu_ticks(), ticks) {
            e.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&seconds),
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&(cpu as f64 / hz as f64), None)?;
        }
        if let (Some(pages), Some(page)) = (stat.rss_pages, page) {
            e.encode_descriptor(
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&bytes),
                MetricType::Gauge,
            )?
            .encode_gauge(&pages.saturating_mul(page))?;
        }
        if let Some(vsize) = stat.vsize {
            e.encode_descriptor(
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(&bytes),
                MetricType::Gauge,
            )?
            .encode_gauge(&vsize)?;
        }
        if let Some(open) = open_fds() {
            gauge(
                e,
                "process_open_fds",
                "Number of open file descriptors.",
                open,
            )?;
        }
        if let Some(max) = read("/proc/self/limits").as_deref().and_then(max_fds) {
            gauge(
                e,
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max,
            )?;
        }
        let boot = read("/proc/stat").as_deref().and_then(boot_time);
        if let (Some(boot), Some(start), Some(hz)) = (boot, stat.start_ticks, ticks) {
            e.encode_descriptor(
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(&seconds),
                MetricType::Gauge,
            )?
            .encode_gauge(&(boot as f64 + start as f64 / hz as f64))?;
        }
        Ok(())
    }
}

/// The fields of `/proc/self/stat` the collector uses (proc(5)); each is `None` when
/// missing or not a number.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stat {
    /// Field 14, `utime`, in clock ticks.
    utime: Option<u64>,
    /// Field 15, `stime`, in clock ticks.
    stime: Option<u64>,
    /// Field 22, `starttime`: clock ticks after boot.
    start_ticks: Option<u64>,
    /// Field 23, `vsize`, in bytes.
    vsize: Option<u64>,
    /// Field 24, `rss`, in pages.
    rss_pages: Option<u64>,
}

impl Stat {
    /// Parses the line. The command name (field 2) is in parentheses and may itself hold
    /// spaces and parentheses, so the fields are counted from the last `)`.
    fn parse(text: &str) -> Self {
        let Some((_, rest)) = text.rsplit_once(')') else {
            return Self::default();
        };
        // `rest` starts at field 3 (`state`).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Self {
            utime: field(14),
            stime: field(15),
            start_ticks: field(22),
            vsize: field(23),
            rss_pages: field(24),
        }
    }

    fn cpu_ticks(&self) -> Option<u64> {
        Some(self.utime?.saturating_add(self.stime?))
    }
}

/// The soft `Max open files` limit from `/proc/self/limits`; `None` when unlimited or
/// unreadable.
fn max_fds(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// `btime` from `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Entries of `/proc/self/fd` (the directory's own descriptor among them, as other
/// clients count it).
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.filter(Result::is_ok).count() as u64)
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A positive `sysconf(3)` value.
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf takes a plain integer and touches no memory of ours; an unknown
    // name makes it return -1, handled below.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields are counted from the last `)`, so a command name with spaces and
    /// parentheses does not shift them.
    #[test]
    fn stat_fields_are_found_after_the_command_name() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    150 25 0 0 20 0 9 0 778899 123456789 2048 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17922 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            Stat::parse(line),
            Stat {
                utime: Some(150),
                stime: Some(25),
                start_ticks: Some(778899),
                vsize: Some(123456789),
                rss_pages: Some(2048),
            }
        );
        assert_eq!(Stat::parse(line).cpu_ticks(), Some(175));
    }

    /// A truncated or garbled line leaves out what is missing, and panics on nothing.
    #[test]
    fn a_short_or_garbled_stat_gives_what_it_has() {
        let short = Stat::parse("1 (init) S 1 1 1 0 -1 0 0 0 0 0 7 x");
        assert_eq!(short.utime, Some(7));
        assert_eq!(short.stime, None);
        assert_eq!(short.cpu_ticks(), None);
        assert_eq!(short.rss_pages, None);
        assert_eq!(Stat::parse("no parenthesis here"), Stat::default());
        assert_eq!(Stat::parse(""), Stat::default());
    }

    #[test]
    fn max_fds_is_the_soft_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_fds(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(max_fds(unlimited), None);
        assert_eq!(max_fds(""), None);
    }

    #[test]
    fn boot_time_is_read_from_btime() {
        assert_eq!(
            boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu 1 2 3\n"), None);
    }

    fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }

    /// Scraping this test process gives plausible values for every metric.
    #[test]
    fn this_process_has_plausible_values() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let text = super::super::encode(&registry).unwrap_or_default();
        assert!(
            value(&text, "process_resident_memory_bytes") > 0.0,
            "{text}"
        );
        assert!(
            value(&text, "process_virtual_memory_bytes")
                >= value(&text, "process_resident_memory_bytes"),
            "{text}"
        );
        let open = value(&text, "process_open_fds");
        assert!(open >= 3.0, "{text}");
        assert!(value(&text, "process_max_fds") >= open, "{text}");
        assert!(value(&text, "process_cpu_seconds_total") >= 0.0, "{text}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let started = value(&text, "process_start_time_seconds");
        // Started before now (to the clock tick) and less than a day ago.
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{started} vs {now}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds counter"),
            "{text}"
        );
    }
}
