//! The durable queue's counters and gauges, per job, as `ringsocket_jobs_*{job="…"}`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use crate::metrics::family;

/// One job's counters: this process's, except the gauges read from Redis (every
/// process's, refreshed every second by a process that runs the job).
#[derive(Debug, Default)]
pub struct JobCounters {
    enqueued: AtomicU64,
    enqueue_failed: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    reclaimed: AtomicU64,
    claims_lost: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    pending: AtomicU64,
    retry_scheduled: AtomicU64,
    dead: AtomicU64,
}

/// A copy of one job's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobCounts {
    /// Jobs Redis took (`XADD` acknowledged).
    pub enqueued: u64,
    /// Enqueues refused (Redis unreachable, busy, shutting down).
    pub enqueue_failed: u64,
    /// Runs that succeeded.
    pub done: u64,
    /// Runs that failed (an error or a panic).
    pub failed: u64,
    /// Failed runs scheduled to run again.
    pub retried: u64,
    /// Jobs moved to the dead-letter stream.
    pub dead_lettered: u64,
    /// Entries taken over from a process that stopped renewing them.
    pub reclaimed: u64,
    /// Entries this process held whose claim another process took over before it was
    /// renewed (the job may run twice).
    pub claims_lost: u64,
    /// Runs in progress here.
    pub running: u64,
}

impl JobCounters {
    /// A copy of the counters.
    pub fn counts(&self) -> JobCounts {
        JobCounts {
            enqueued: self.enqueued.load(Relaxed),
            enqueue_failed: self.enqueue_failed.load(Relaxed),
            done: self.done.load(Relaxed),
            failed: self.failed.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            reclaimed: self.reclaimed.load(Relaxed),
            claims_lost: self.claims_lost.load(Relaxed),
            running: self.running.load(Relaxed),
        }
    }

    pub(super) fn enqueued(&self) {
        self.enqueued.fetch_add(1, Relaxed);
    }

    pub(super) fn enqueue_failed(&self) {
        self.enqueue_failed.fetch_add(1, Relaxed);
    }

    pub(super) fn started(&self) {
        self.running.fetch_add(1, Relaxed);
    }

    pub(super) fn finished(&self, ok: bool) {
        let _ = self
            .running
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
        if ok {
            self.done.fetch_add(1, Relaxed);
        } else {
            self.failed.fetch_add(1, Relaxed);
        }
    }

    pub(super) fn retried(&self) {
        self.retried.fetch_add(1, Relaxed);
    }

    pub(super) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
    }

    pub(super) fn reclaimed(&self) {
        self.reclaimed.fetch_add(1, Relaxed);
    }

    pub(super) fn claim_lost(&self) {
        self.claims_lost.fetch_add(1, Relaxed);
    }

    pub(super) fn set_gauges(&self, waiting: u64, pending: u64, retry: u64, dead: u64) {
        self.waiting.store(waiting, Relaxed);
        self.pending.store(pending, Relaxed);
        self.retry_scheduled.store(retry, Relaxed);
        self.dead.store(dead, Relaxed);
    }
}

/// Every registered job's counters.
#[derive(Debug)]
pub struct JobMetrics {
    names: Vec<Arc<str>>,
    jobs: Vec<JobCounters>,
}

type Read = fn(&JobCounters) -> &AtomicU64;

/// The families: name (under `ringsocket_`), help, type, the value.
const FAMILIES: [(&str, &str, MetricType, Read); 13] = [
    (
        "jobs_enqueued",
        "Durable jobs Redis took (XADD acknowledged).",
        MetricType::Counter,
        |c| &c.enqueued,
    ),
    (
        "jobs_enqueue_failed",
        "Durable enqueues refused: Redis unreachable, busy or shutting down.",
        MetricType::Counter,
        |c| &c.enqueue_failed,
    ),
    (
        "jobs_done",
        "Durable job runs that succeeded.",
        MetricType::Counter,
        |c| &c.done,
    ),
    (
        "jobs_failed",
        "Durable job runs that failed (an error or a panic).",
        MetricType::Counter,
        |c| &c.failed,
    ),
    (
        "jobs_retried",
        "Failed durable job runs scheduled to run again.",
        MetricType::Counter,
        |c| &c.retried,
    ),
    (
        "jobs_dead_lettered",
        "Durable jobs moved to their dead-letter stream.",
        MetricType::Counter,
        |c| &c.dead_lettered,
    ),
    (
        "jobs_reclaimed",
        "Durable jobs taken over from a process that stopped renewing them.",
        MetricType::Counter,
        |c| &c.reclaimed,
    ),
    (
        "jobs_claims_lost",
        "Durable jobs held here that another process took over before their claim was renewed.",
        MetricType::Counter,
        |c| &c.claims_lost,
    ),
    (
        "jobs_running",
        "Durable job runs in progress in this process.",
        MetricType::Gauge,
        |c| &c.running,
    ),
    (
        "jobs_waiting",
        "Durable jobs in Redis not yet delivered to any process.",
        MetricType::Gauge,
        |c| &c.waiting,
    ),
    (
        "jobs_pending",
        "Durable jobs delivered to a process and not yet settled (every process).",
        MetricType::Gauge,
        |c| &c.pending,
    ),
    (
        "jobs_retry_scheduled",
        "Failed durable jobs waiting for their retry backoff.",
        MetricType::Gauge,
        |c| &c.retry_scheduled,
    ),
    (
        "jobs_dead",
        "Entries in the dead-letter streams.",
        MetricType::Gauge,
        |c| &c.dead,
    ),
];

impl JobMetrics {
    pub(super) fn new(names: &[Arc<str>]) -> Self {
        Self {
            names: names.to_vec(),
            jobs: names.iter().map(|_| JobCounters::default()).collect(),
        }
    }

    pub(super) fn job(&self, index: usize) -> &JobCounters {
        &self.jobs[index]
    }

    /// The counters of job `name`.
    pub fn by_name(&self, name: &str) -> Option<&JobCounters> {
        let index = self.names.iter().position(|n| &**n == name)?;
        self.jobs.get(index)
    }

    /// Encodes the `jobs_*` families, one sample per job.
    pub fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        for (name, help, metric_type, read) in FAMILIES {
            let rows = self
                .names
                .iter()
                .zip(&self.jobs)
                .map(|(job, counters)| (job.to_string(), read(counters).load(Relaxed)));
            family(encoder, name, help, metric_type, "job", rows)?;
        }
        Ok(())
    }
}
