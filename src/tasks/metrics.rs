//! The executor's counters, in `/metrics` beside the workers'.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Unit;

use super::TaskHandle;
use crate::metrics::{counter, gauge, histogram};

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

    /// Encodes these counters as the `tasks_*` families (`ringsocket_tasks_*` under the
    /// registry's prefix); `capacity` is the queue's.
    pub fn encode(&self, capacity: usize, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        gauge(
            encoder,
            "tasks_queue_capacity",
            "Jobs the background queue holds (task_queue_capacity).",
            capacity as u64,
        )?;
        gauge(
            encoder,
            "tasks_queued",
            "Background jobs waiting in the queue.",
            self.queued(),
        )?;
        gauge(
            encoder,
            "tasks_running",
            "Background jobs running now.",
            self.running(),
        )?;
        counter(
            encoder,
            "tasks_done",
            "Background jobs that returned.",
            self.done(),
        )?;
        counter(
            encoder,
            "tasks_failed",
            "Background jobs that panicked.",
            self.failed(),
        )?;
        counter(
            encoder,
            "tasks_rejected",
            "Background jobs refused (queue full or shutting down).",
            self.rejected_total(),
        )?;
        counter(
            encoder,
            "tasks_abandoned",
            "Background jobs not finished by the shutdown deadline.",
            self.abandoned_total(),
        )?;
        let mut buckets: Vec<(f64, u64)> = WAIT_BUCKETS
            .iter()
            .zip(&self.wait_buckets)
            .map(|(bound, n)| (*bound, n.load(Relaxed)))
            .collect();
        buckets.push((
            f64::INFINITY,
            self.wait_buckets[WAIT_BUCKETS.len()].load(Relaxed),
        ));
        histogram(
            encoder,
            "tasks_queue_wait",
            "Time background jobs waited in the queue.",
            &Unit::Seconds,
            &buckets,
            self.wait_micros.load(Relaxed) as f64 / 1e6,
        )
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

/// The executor's counters at scrape time, with its queue's capacity.
impl Collector for TaskHandle {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.metrics().encode(self.capacity(), &mut encoder)?;
        match self.jobs() {
            Some(jobs) => jobs.metrics().encode(&mut encoder),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters with a queue of 8.
    #[derive(Debug)]
    struct Eight(TaskMetrics);

    impl Collector for Eight {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            self.0.encode(8, &mut encoder)
        }
    }

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
        let text = crate::metrics::render_collector(Eight(metrics));
        for line in [
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.0001\"} 1",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.001\"} 1",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"0.005\"} 2",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"10.0\"} 2",
            "ringsocket_tasks_queue_wait_seconds_bucket{le=\"+Inf\"} 3",
            "ringsocket_tasks_queue_wait_seconds_count 3",
            "ringsocket_tasks_queue_wait_seconds_sum 20.00205",
            "ringsocket_tasks_queued 0",
            "ringsocket_tasks_queue_capacity 8",
            "ringsocket_tasks_done_total 0",
            "# TYPE ringsocket_tasks_done counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
