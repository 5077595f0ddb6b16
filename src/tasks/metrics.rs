//! The executor's counters, in `/metrics` beside the workers'.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the queue-wait histogram buckets, in seconds.
const WAIT_BUCKETS: [f64; 8] = [0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 1.0, 10.0];

/// Background job counters. Written by the I/O cores (queued, rejected) and the
/// executor threads (the rest), with relaxed atomic adds.
#[derive(Debug, Default)]
pub struct TaskMetrics {
    queued: AtomicU64,
    running: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    abandoned: AtomicU64,
    /// Jobs whose wait fell in each bucket (not cumulative), the last for +Inf.
    wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
    wait_micros: AtomicU64,
}

impl TaskMetrics {
    /// Jobs in the queue now.
    pub fn queued(&self) -> u64 {
        self.queued.load(Relaxed)
    }

    /// Jobs running now.
    pub fn running(&self) -> u64 {
        self.running.load(Relaxed)
    }

    /// Jobs that returned.
    pub fn done(&self) -> u64 {
        self.done.load(Relaxed)
    }

    /// Jobs that panicked.
    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    /// Jobs refused: queue full or shutting down.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.load(Relaxed)
    }

    /// Jobs abandoned at the shutdown deadline.
    pub fn abandoned_total(&self) -> u64 {
        self.abandoned.load(Relaxed)
    }

    /// The Prometheus text exposition, `ringsocket_tasks_*`.
    pub fn render(&self, capacity: usize) -> String {
        let mut out = String::with_capacity(2048);
        let mut one = |name: &str, help: &str, kind: &str, value: u64| {
            crate::metrics::write_family(
                &mut out,
                &format!("tasks_{name}"),
                help,
                kind,
                &[(String::new(), value)],
            );
        };
        one(
            "queue_capacity",
            "Jobs the background queue holds (task_queue_capacity).",
            "gauge",
            capacity as u64,
        );
        one(
            "queued",
            "Background jobs waiting in the queue.",
            "gauge",
            self.queued(),
        );
        one(
            "running",
            "Background jobs running now.",
            "gauge",
            self.running(),
        );
        one(
            "done_total",
            "Background jobs that returned.",
            "counter",
            self.done(),
        );
        one(
            "failed_total",
            "Background jobs that panicked.",
            "counter",
            self.failed(),
        );
        one(
            "rejected_total",
            "Background jobs refused (queue full or shutting down).",
            "counter",
            self.rejected_total(),
        );
        one(
            "abandoned_total",
            "Background jobs not finished by the shutdown deadline.",
            "counter",
            self.abandoned_total(),
        );
        let name = "ringsocket_tasks_queue_wait_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time background jobs waited in the queue.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in WAIT_BUCKETS.iter().enumerate() {
            cumulative += self.wait_buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.wait_buckets[WAIT_BUCKETS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.wait_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
        out
    }

    pub(crate) fn enqueued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }

    /// A job counted as queued did not get into the queue after all.
    pub(crate) fn unqueued(&self) {
        self.queued.fetch_sub(1, Relaxed);
    }

    /// A job left the queue after `wait`.
    pub(crate) fn dequeued(&self, wait: Duration) {
        self.queued.fetch_sub(1, Relaxed);
        let secs = wait.as_secs_f64();
        let bucket = WAIT_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[bucket].fetch_add(1, Relaxed);
        self.wait_micros
            .fetch_add(wait.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub(crate) fn started(&self) {
        self.running.fetch_add(1, Relaxed);
    }

    pub(crate) fn finished(&self, ok: bool) {
        self.running.fetch_sub(1, Relaxed);
        if ok {
            self.done.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub(crate) fn abandoned(&self, n: u64) {
        self.abandoned.fetch_add(n, Relaxed);
    }

    /// Jobs that ran to the end, returning or panicking.
    pub(crate) fn completed(&self) -> u64 {
        self.done() + self.failed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buckets are cumulative in the text, `_count` is every job, `_sum` in seconds.
    #[test]
    fn queue_wait_histogram_is_cumulative() {
        let metrics = TaskMetrics::default();
        for _ in 0..3 {
            metrics.enqueued();
        }
        metrics.dequeued(Duration::from_micros(50));
        metrics.dequeued(Duration::from_millis(2));
        metrics.dequeued(Duration::from_secs(20));
        let text = metrics.render(8);
        for line in [
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.0001\"} 1",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.001\"} 1",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.005\"} 2",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"10\"} 2",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"+Inf\"} 3",
            "ringsocket_tasks_queue_wait_seconds_count 3",
            "ringsocket_tasks_queue_wait_seconds_sum 20.00205",
            "ringsocket_tasks_queued 0",
            "ringsocket_tasks_queue_capacity 8",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
