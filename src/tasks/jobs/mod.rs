//! Durable background jobs: named jobs with a payload, kept in Redis Streams until a
//! handler has run them, so that a job a client was answered 202 for survives a crash,
//! a restart or a shutdown that ran out of time. Opt-in: an app that registers a job
//! with [`App::job`](crate::app::App::job) gets a queue, on `jobs_redis_url` (default
//! `redis_url`).
//!
//! ```no_run
//! use ringsocket::app::App;
//! use ringsocket::runtime::Response;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Email { to: String }
//!
//! let app = App::new()
//!     .job("send_email", |job| async move {
//!         let email: Email = job.json().map_err(|e| e.to_string())?;
//!         // ... talk to the mail server; an `Err` is retried with backoff.
//!         let _ = email.to;
//!         Ok::<(), String>(())
//!     })
//!     .post("/signup", |req| async move {
//!         let to = String::from_utf8_lossy(req.body()).into_owned();
//!         match req.tasks().enqueue("send_email", &Email { to }).await {
//!             Ok(id) => Response::text(202, format!("queued {id}\n")),
//!             // Redis unreachable: the server answers 503 + Retry-After in place of this.
//!             Err(e) => Response::error(503, &e.to_string()),
//!         }
//!     });
//! ```
//!
//! # In Redis
//!
//! Each job name has a stream `{jobs_stream_prefix}{name}` (the name in braces: a
//! Redis Cluster hash tag, so a job's keys share a slot), read by the consumer group
//! `ringsocket`, a sorted set `…:retry` of failed runs waiting for their backoff, and a
//! dead-letter stream `…:dead`. A stream entry has the fields `payload`, and after a
//! failure `attempts` (runs so far), `origin` (the first entry's id) and `error`.
//!
//! - **Redis** must be a single server (not a Cluster: with `redis_cluster` set,
//!   `jobs_redis_url` must be), with `appendonly yes` and `maxmemory-policy
//!   noeviction`, or an acknowledged job may be lost; the queue warns on its first
//!   connection when `CONFIG GET` says otherwise.
//! - **Enqueue**: `XADD` by the process's writer thread (`ringsocket-jobs-w`); the
//!   [`Enqueue`] future resolves once Redis acknowledged it. An HTTP handler's response
//!   waits for every enqueue the handler made (awaited or not): a 202 means the job is
//!   in Redis. An enqueue that fails (Redis unreachable, the writer's queue of
//!   [`ENQUEUE_QUEUE`] full, shutting down) fails the request: 503 with
//!   `Retry-After: 1` under [`QueueFullPolicy::Reject503`](super::QueueFullPolicy), the
//!   default; counted in `ringsocket_jobs_enqueue_failed_total` and logged (at most a
//!   line a second). Jobs of the same request that were already written stay in Redis,
//!   and so may one whose connection broke after Redis took it: a client that retries
//!   after a 503 may enqueue a job twice (at least once, again).
//! - **Run**: every process whose app registers the job reads with `XREADGROUP` as
//!   its own consumer (`host:pid:random`, thread `ringsocket-jobs-r`), at most
//!   `job_concurrency` jobs at once, and runs the handler on the executor threads
//!   (`task_threads`), never on an I/O core. While a job runs, and until its outcome
//!   is written, its process renews its claim (`XCLAIM … JUSTID`, in a script that
//!   first checks that this consumer still owns the entry) every third of
//!   `job_visibility_timeout_secs`; a claim another process took over stays that
//!   process's (`ringsocket_jobs_claims_lost_total`).
//! - **Success**: `XACK` and `XDEL`. **Failure** (an `Err` or a panic): the entry is
//!   acknowledged and a copy with `attempts + 1` and the error goes to the retry set,
//!   due after `job_retry_backoff_ms × 2^(attempts − 1)` (at most an hour), then back to
//!   the stream. After `job_max_attempts` runs it goes to the dead-letter stream
//!   instead (fields `job`, `id`, `origin`, `attempts`, `error`, `payload`,
//!   `failed_at_ms`, `consumer`; trimmed to about `job_dead_letter_maxlen`). Each of
//!   these is one Lua script, atomic in Redis.
//! - **A process that died**: its entries stay pending; once one has not been renewed
//!   for `job_visibility_timeout_secs`, another process takes it (`XAUTOCLAIM`) and
//!   runs it again, counted in `ringsocket_jobs_reclaimed_total`. Delivery is **at
//!   least once**: a job may run twice (it ran but the process died before its
//!   `XACK`), so make handlers idempotent. [`Job::attempt`] counts runs, cut-short
//!   ones too (the delivery count of `XPENDING`); a job whose process died
//!   `job_max_attempts` times goes to the dead-letter stream.
//! - **Shutdown**: no new job is read; running ones finish within
//!   `shutdown_timeout_secs` (the executor's drain), their claims renewed meanwhile;
//!   what is left is released (its
//!   claim aged past the visibility timeout, so another process takes it at once) and
//!   stays in Redis for the next start. One log line gives the counts.
//!
//! While Redis is away the reader and writer reconnect with backoff; outcomes of jobs
//! that ran meanwhile are kept and written once it is back (settling twice is a no-op).

mod metrics;
mod reader;
#[cfg(test)]
mod test_redis;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use tokio::sync::Notify;

pub use metrics::{JobCounters, JobCounts, JobMetrics};

use super::TaskHandle;
use crate::config::Config;

/// The consumer group of every job stream.
pub const GROUP: &str = "ringsocket";
/// Enqueues waiting for the writer thread; beyond it an enqueue fails at once
/// ([`EnqueueError::Busy`]).
pub const ENQUEUE_QUEUE: usize = 4096;
/// The longest retry backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The longest a job name may be.
pub const MAX_NAME_LEN: usize = 128;

type Handler = Arc<dyn Fn(Job) -> BoxFuture + Send + Sync>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The jobs an app registers: name → handler. Built by [`App::job`](crate::app::App::job).
#[derive(Clone, Default)]
pub struct JobRegistry {
    jobs: Vec<(Arc<str>, Handler)>,
    errors: Vec<String>,
}

impl fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl JobRegistry {
    /// Registers `handler` for the job `name` (1 to [`MAX_NAME_LEN`] of `A-Z a-z 0-9
    /// _ . : -`). The handler runs on an executor thread; an `Err` (its `Display` is
    /// recorded) or a panic is retried. A bad or repeated name is kept as an error
    /// for [`JobRegistry::check`].
    pub fn register<F, Fut, E>(&mut self, name: &str, handler: F)
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        if let Err(e) = check_name(name) {
            self.errors.push(e);
            return;
        }
        if self.jobs.iter().any(|(n, _)| &**n == name) {
            self.errors
                .push(format!("job {name:?} is registered twice"));
            return;
        }
        let handler: Handler = Arc::new(move |job| {
            let future = handler(job);
            Box::pin(async move { future.await.map_err(|e| e.to_string()) })
        });
        self.jobs.push((name.into(), handler));
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.jobs.iter().map(|(n, _)| &**n)
    }

    /// Whether no job is registered (then no queue is started).
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The first registration error (a bad or repeated name).
    pub fn check(&self) -> Result<(), String> {
        self.errors.first().map_or(Ok(()), |e| Err(e.clone()))
    }
}

/// Checks a job name (it goes into Redis keys and metric labels).
fn check_name(name: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok) {
        return Err(format!(
            "job name {name:?}: 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . : -"
        ));
    }
    Ok(())
}

/// One run of a job, as its handler gets it.
#[derive(Debug, Clone)]
pub struct Job {
    name: Arc<str>,
    id: String,
    payload: Bytes,
    attempt: u32,
    max_attempts: u32,
}

impl Job {
    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the stream entry (a retry is a new entry with a new id).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The payload, as enqueued.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload as JSON (for jobs enqueued with `enqueue`).
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// This run's number, from 1: failed runs before it, plus runs cut short by a
    /// process that stopped (the stream's delivery count).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether a failure of this run sends the job to the dead-letter stream.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

/// The id Redis gave an enqueued job (its stream entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(pub String);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a job was not enqueued. It will not run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnqueueError {
    /// The app registers no durable job (see [`App::job`](crate::app::App::job)), or
    /// the server has not started its queue.
    NotConfigured,
    /// No job of this name is registered.
    UnknownJob(String),
    /// The payload could not be serialized.
    Encode(String),
    /// Redis did not take it (unreachable, or an error reply); the cause.
    Unavailable(String),
    /// [`ENQUEUE_QUEUE`] enqueues are already waiting for Redis.
    Busy,
    /// The server is shutting down.
    ShuttingDown,
}

impl EnqueueError {
    /// Whether retrying later may succeed (the HTTP answer is 503, else 500).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Busy | Self::ShuttingDown)
    }
}

impl fmt::Display for EnqueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConfigured => f.write_str(
                "no durable job queue: the app registers no job (App::job) or the server is not started",
            ),
            Self::UnknownJob(name) => write!(f, "no durable job named {name:?} is registered"),
            Self::Encode(e) => write!(f, "job payload not serializable: {e}"),
            Self::Unavailable(e) => write!(f, "durable job queue unavailable: {e}"),
            Self::Busy => write!(
                f,
                "durable job queue busy: {ENQUEUE_QUEUE} enqueues already wait for Redis"
            ),
            Self::ShuttingDown => f.write_str("durable job queue shutting down"),
        }
    }
}

impl std::error::Error for EnqueueError {}

/// What an enqueue comes to.
type EnqueueResult = Result<JobId, EnqueueError>;

/// The answer to one enqueue, set once by the writer thread.
pub(crate) struct Ack {
    result: OnceLock<Result<JobId, EnqueueError>>,
    done: Notify,
}

impl Ack {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            result: OnceLock::new(),
            done: Notify::new(),
        })
    }

    fn failed(e: EnqueueError) -> Arc<Self> {
        let ack = Self::new();
        let _ = ack.result.set(Err(e));
        ack
    }

    fn set(&self, result: Result<JobId, EnqueueError>) {
        if self.result.set(result).is_ok() {
            self.done.notify_waiters();
        }
    }

    /// Waits for the answer.
    pub(crate) async fn wait(&self) -> Result<JobId, EnqueueError> {
        loop {
            let notified = self.done.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check: a `set` after it wakes this wait.
            notified.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone();
            }
            notified.await;
        }
    }

    /// The answer, if there is one yet.
    pub(crate) fn get(&self) -> Option<&Result<JobId, EnqueueError>> {
        self.result.get()
    }
}

/// The writer's side of an [`Ack`]: answers "unavailable" if dropped unanswered.
pub(crate) struct AckSender(Arc<Ack>);

impl AckSender {
    fn send(self, result: Result<JobId, EnqueueError>) {
        self.0.set(result);
    }
}

impl Drop for AckSender {
    fn drop(&mut self) {
        self.0.set(Err(EnqueueError::Unavailable(
            "the job writer stopped".into(),
        )));
    }
}

/// An enqueue on its way to Redis: already sent to the writer thread when created;
/// await it for the job's id (or why it was refused). Dropping it does not cancel the
/// job; an HTTP request's response waits for it anyway.
pub struct Enqueue {
    ack: Arc<Ack>,
    wait: Option<Pin<Box<dyn Future<Output = EnqueueResult> + Send>>>,
}

impl fmt::Debug for Enqueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enqueue")
            .field("result", &self.ack.get())
            .finish()
    }
}

impl Enqueue {
    pub(crate) fn new(ack: Arc<Ack>) -> Self {
        Self { ack, wait: None }
    }

    pub(crate) fn failed(e: EnqueueError) -> Self {
        Self::new(Ack::failed(e))
    }

    pub(crate) fn ack(&self) -> Arc<Ack> {
        self.ack.clone()
    }
}

impl Future for Enqueue {
    type Output = Result<JobId, EnqueueError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(result) = self.ack.get() {
            return Poll::Ready(result.clone());
        }
        let ack = self.ack.clone();
        self.wait
            .get_or_insert_with(|| Box::pin(async move { ack.wait().await }))
            .as_mut()
            .poll(cx)
    }
}

/// Settings of the durable job queue. Build with [`JobSettings::new`] or
/// [`JobSettings::from_config`].
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct JobSettings {
    /// The Redis server (`jobs_redis_url`, else `redis_url`).
    pub url: String,
    /// `jobs_stream_prefix`. Default `ringsocket:jobs:`.
    pub prefix: String,
    /// `job_max_attempts`. Default 5.
    pub max_attempts: u32,
    /// `job_retry_backoff_ms`. Default 1 s.
    pub retry_backoff: Duration,
    /// `job_visibility_timeout_secs`. Default 30 s.
    pub visibility_timeout: Duration,
    /// `job_concurrency`. Default 16.
    pub concurrency: usize,
    /// `job_dead_letter_maxlen`. Default 10,000.
    pub dead_letter_maxlen: usize,
    /// Longest wait for a connection or a reply. Default 2 s.
    pub io_timeout: Duration,
}

impl fmt::Debug for JobSettings {
    /// The URL's credentials masked: a `Debug` print may reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSettings")
            .field("url", &crate::config::mask_url_password(&self.url))
            .field("prefix", &self.prefix)
            .field("max_attempts", &self.max_attempts)
            .field("retry_backoff", &self.retry_backoff)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("concurrency", &self.concurrency)
            .field("dead_letter_maxlen", &self.dead_letter_maxlen)
            .field("io_timeout", &self.io_timeout)
            .finish()
    }
}

impl JobSettings {
    /// The defaults, for the Redis server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "ringsocket:jobs:".into(),
            max_attempts: 5,
            retry_backoff: Duration::from_secs(1),
            visibility_timeout: Duration::from_secs(30),
            concurrency: 16,
            dead_letter_maxlen: 10_000,
            io_timeout: Duration::from_secs(2),
        }
    }

    /// The settings of a server configuration; `Ok(None)` when neither
    /// `jobs_redis_url` nor `redis_url` is set. `Err` when only `redis_url` is set and
    /// it is a Redis Cluster (`redis_cluster = true`): the queue needs a single Redis.
    pub fn from_config(config: &Config) -> Result<Option<Self>, String> {
        let url = if config.jobs_redis_url.is_empty() {
            if config.redis_cluster && !config.redis_url.is_empty() {
                return Err(
                    "durable jobs need a single Redis server (not a Redis Cluster): \
                     redis_cluster = true, so redis_url cannot be used for them; set \
                     jobs_redis_url to one Redis server"
                        .into(),
                );
            }
            &config.redis_url
        } else {
            &config.jobs_redis_url
        };
        if url.is_empty() {
            return Ok(None);
        }
        let mut settings = Self::new(url.clone());
        settings.prefix.clone_from(&config.jobs_stream_prefix);
        settings.max_attempts = config.job_max_attempts;
        settings.retry_backoff = Duration::from_millis(config.job_retry_backoff_ms);
        settings.visibility_timeout = Duration::from_secs(config.job_visibility_timeout_secs);
        settings.concurrency = config.job_concurrency;
        settings.dead_letter_maxlen = config.job_dead_letter_maxlen;
        Ok(Some(settings))
    }

    /// The wait before the retry that follows `failed` failed runs (from 1).
    pub fn backoff(&self, failed: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failed.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.retry_backoff
            .checked_mul(factor)
            .unwrap_or(MAX_BACKOFF)
            .min(MAX_BACKOFF)
    }

    fn check(&self) -> Result<(), String> {
        if self.prefix.contains(['{', '}']) {
            return Err(format!(
                "jobs_stream_prefix {:?} must not contain braces (the job name is the hash tag)",
                self.prefix
            ));
        }
        if self.max_attempts == 0 || self.retry_backoff.is_zero() {
            return Err("job_max_attempts and job_retry_backoff_ms must be above 0".into());
        }
        if self.visibility_timeout < Duration::from_secs(1) {
            return Err("job_visibility_timeout_secs must be at least 1".into());
        }
        redis::Client::open(self.url.as_str())
            .map(drop)
            .map_err(|e| format!("jobs Redis URL: {e}"))
    }
}

/// The Redis keys of one job.
#[derive(Debug, Clone)]
struct Keys {
    stream: String,
    retry: String,
    dead: String,
}

impl Keys {
    fn new(prefix: &str, name: &str) -> Self {
        let stream = format!("{prefix}{{{name}}}");
        Self {
            retry: format!("{stream}:retry"),
            dead: format!("{stream}:dead"),
            stream,
        }
    }
}

/// One registered job, as the threads see it.
struct Slot {
    name: Arc<str>,
    keys: Keys,
    handler: Handler,
}

/// Enqueues durable jobs. Cloneable and `Send`; reached through
/// [`TaskHandle::enqueue`] and [`BackgroundTasks::enqueue`](super::BackgroundTasks::enqueue).
#[derive(Clone)]
pub struct JobQueue {
    inner: Arc<QueueInner>,
}

struct QueueInner {
    names: Vec<Arc<str>>,
    writer: Sender<writer::Command>,
    metrics: Arc<JobMetrics>,
    closed: AtomicBool,
    /// Enqueues sent to the writer and not answered yet (at most [`ENQUEUE_QUEUE`]).
    waiting: Arc<AtomicUsize>,
}

impl fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobQueue")
            .field("jobs", &self.inner.names)
            .finish_non_exhaustive()
    }
}

impl JobQueue {
    /// Enqueues job `name` with `payload` as JSON.
    pub fn enqueue<T: serde::Serialize + ?Sized>(&self, name: &str, payload: &T) -> Enqueue {
        match serde_json::to_vec(payload) {
            Ok(bytes) => self.enqueue_bytes(name, bytes),
            Err(e) => Enqueue::failed(EnqueueError::Encode(e.to_string())),
        }
    }

    /// Enqueues job `name` with `payload` as it is.
    pub fn enqueue_bytes(&self, name: &str, payload: impl Into<Bytes>) -> Enqueue {
        let inner = &self.inner;
        let Some(job) = inner.names.iter().position(|n| &**n == name) else {
            return Enqueue::failed(EnqueueError::UnknownJob(name.to_owned()));
        };
        let refuse = |e: EnqueueError| {
            inner.metrics.job(job).enqueue_failed();
            Enqueue::failed(e)
        };
        if inner.closed.load(Ordering::Acquire) {
            return refuse(EnqueueError::ShuttingDown);
        }
        let ack = Ack::new();
        let command = writer::Command::Enqueue {
            job,
            payload: payload.into(),
            ack: AckSender(ack.clone()),
        };
        // Taken back by the writer when it answers.
        let waiting = inner.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= ENQUEUE_QUEUE {
            inner.waiting.fetch_sub(1, Ordering::AcqRel);
            return refuse(EnqueueError::Busy);
        }
        match inner.writer.send(command) {
            Ok(()) => Enqueue::new(ack),
            Err(_) => {
                inner.waiting.fetch_sub(1, Ordering::AcqRel);
                refuse(EnqueueError::ShuttingDown)
            }
        }
    }

    /// The queue's counters.
    pub fn metrics(&self) -> &JobMetrics {
        &self.inner.metrics
    }
}

/// What the reader, the writer and the jobs' futures share.
struct Shared {
    settings: JobSettings,
    slots: Vec<Slot>,
    metrics: Arc<JobMetrics>,
    /// This process's consumer name in every group.
    consumer: String,
    /// Entries read by this process whose outcome Redis does not have yet: kept (and
    /// their claims renewed) until the writer has written it.
    in_flight: Mutex<HashMap<(usize, String), Held>>,
    /// A job ended: the reader may read more.
    freed: (Sender<()>, Receiver<()>),
    /// No new job is read; the reader only renews the claims of the running ones.
    stop: AtomicBool,
    /// The shutdown's deadline passed (or every job is done): renewals end too.
    halt: AtomicBool,
    /// The Redis configuration was checked (by the first connection, reader's or
    /// writer's: a process with `job_concurrency = 0` has no reader).
    durability_checked: AtomicBool,
    writer: Sender<writer::Command>,
    /// The queue's count of enqueues waiting for the writer.
    waiting: Arc<AtomicUsize>,
    tasks: TaskHandle,
    addr: String,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Warns, once per process, when the Redis of `con` may lose acknowledged jobs.
    fn check_durability(&self, con: &mut redis::Connection) {
        if self.durability_checked.swap(true, Ordering::SeqCst) {
            return;
        }
        for warning in reader::durability_warnings(con) {
            tracing::warn!(addr = %self.addr, "durable jobs: {warning}");
        }
    }

    fn halted(&self) -> bool {
        self.halt.load(Ordering::SeqCst)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, String), Held>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects with the I/O timeouts set.
    fn connect(&self, client: &redis::Client) -> redis::RedisResult<redis::Connection> {
        let con = client.get_connection_with_timeout(self.settings.io_timeout)?;
        con.set_write_timeout(Some(self.settings.io_timeout))?;
        // Room for the reader's blocking read on top.
        con.set_read_timeout(Some(self.settings.io_timeout + reader::POLL))?;
        Ok(con)
    }
}

/// One entry held by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// Its delivery count when read.
    deliveries: u32,
    /// The run ended; the outcome is on its way to Redis.
    settled: bool,
    /// A renewal found that another process took it over (counted and logged once).
    lost: bool,
}

impl Held {
    fn new(deliveries: u32) -> Self {
        Self {
            deliveries,
            settled: false,
            lost: false,
        }
    }
}

/// The durable job queue of a running server: its reader and writer threads.
/// Started by [`Server::start`](crate::runtime::Server::start) when the app registers
/// jobs; stopped in two steps around the executor's drain.
pub struct DurableJobs {
    shared: Arc<Shared>,
    queue: JobQueue,
    reader: Option<JoinHandle<()>>,
    /// Says when the reader stopped reading (it goes on renewing claims).
    reading_stopped: Receiver<()>,
    writer: Option<JoinHandle<()>>,
    running_at_stop: Option<u64>,
}

impl fmt::Debug for DurableJobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableJobs")
            .field("addr", &self.shared.addr)
            .field("consumer", &self.shared.consumer)
            .field("jobs", &self.queue.inner.names)
            .finish_non_exhaustive()
    }
}

/// What [`DurableJobs::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobsReport {
    /// Jobs that were running (or handed to the executor) when the shutdown began and
    /// ended before its deadline.
    pub finished: u64,
    /// Jobs still unfinished at the deadline: left pending in Redis, released so that
    /// another process (or the next start) runs them.
    pub left_pending: u64,
}

impl DurableJobs {
    /// Starts the writer and, unless `settings.concurrency` is 0, the reader, running
    /// the jobs of `registry` on `tasks`' executor. Fails for a bad setting or name
    /// (Redis being down is logged and retried).
    pub fn start(
        settings: JobSettings,
        registry: JobRegistry,
        tasks: TaskHandle,
    ) -> Result<Self, String> {
        settings.check()?;
        registry.check()?;
        let client = redis::Client::open(settings.url.as_str()).map_err(|e| e.to_string())?;
        let addr = client.get_connection_info().addr().to_string();
        let names: Vec<Arc<str>> = registry.jobs.iter().map(|(n, _)| n.clone()).collect();
        let metrics = Arc::new(JobMetrics::new(&names));
        // Unbounded: enqueues are bounded by `waiting`, outcomes by `job_concurrency`.
        let (writer_tx, writer_rx) = crossbeam_channel::unbounded();
        let waiting = Arc::new(AtomicUsize::new(0));
        let slots = registry
            .jobs
            .into_iter()
            .map(|(name, handler)| Slot {
                keys: Keys::new(&settings.prefix, &name),
                name,
                handler,
            })
            .collect();
        let shared = Arc::new(Shared {
            consumer: consumer_name(),
            settings,
            slots,
            metrics: metrics.clone(),
            in_flight: Mutex::new(HashMap::new()),
            freed: crossbeam_channel::bounded(1),
            stop: AtomicBool::new(false),
            halt: AtomicBool::new(false),
            durability_checked: AtomicBool::new(false),
            writer: writer_tx.clone(),
            waiting: waiting.clone(),
            tasks,
            addr,
        });
        let writer = {
            let shared = shared.clone();
            let client = client.clone();
            std::thread::Builder::new()
                .name("ringsocket-jobs-w".into())
                .spawn(move || writer::run(&shared, &client, &writer_rx))
                .map_err(|e| format!("cannot start the job writer thread: {e}"))?
        };
        let (stopped_tx, reading_stopped) = crossbeam_channel::bounded(1);
        let reader = if shared.settings.concurrency > 0 {
            let shared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("ringsocket-jobs-r".into())
                    .spawn(move || reader::run(&shared, &client, &stopped_tx))
                    .map_err(|e| format!("cannot start the job reader thread: {e}"))?,
            )
        } else {
            None
        };
        tracing::info!(
            addr = %shared.addr,
            consumer = %shared.consumer,
            jobs = ?names,
            concurrency = shared.settings.concurrency,
            "durable jobs: queue started"
        );
        Ok(Self {
            queue: JobQueue {
                inner: Arc::new(QueueInner {
                    names,
                    writer: writer_tx,
                    metrics,
                    closed: AtomicBool::new(false),
                    waiting,
                }),
            },
            shared,
            reader,
            reading_stopped,
            writer: Some(writer),
            running_at_stop: None,
        })
    }

    /// The handle that enqueues.
    pub fn queue(&self) -> JobQueue {
        self.queue.clone()
    }

    /// The first step of a shutdown: no new job is read (the reader stops after its
    /// current read, within a fraction of a second). Jobs running go on, and so do the
    /// renewals of their claims, until they end or [`DurableJobs::shutdown`].
    pub fn stop_reading(&mut self) {
        if self.running_at_stop.is_some() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.freed.0.try_send(());
        if self.reader.is_some() {
            let wait = 2 * self.shared.settings.io_timeout + 2 * reader::POLL;
            let _ = self.reading_stopped.recv_timeout(wait);
        }
        let running = self
            .shared
            .in_flight()
            .values()
            .filter(|h| !h.settled)
            .count();
        self.running_at_stop = Some(running as u64);
    }

    /// The last step, after the executor's drain: takes no more enqueues, releases the
    /// jobs still unfinished (another process takes them at once), writes the
    /// outcomes not yet written (for at most the I/O timeout), and logs the counts.
    pub fn shutdown(mut self) -> JobsReport {
        self.stop_reading();
        // The drain is over: the renewals end.
        self.shared.halt.store(true, Ordering::SeqCst);
        let _ = self.shared.freed.0.try_send(());
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.queue.inner.closed.store(true, Ordering::Release);
        // Those that ended keep their place until the writer has written their outcome.
        let left: Vec<((usize, String), Held)> = {
            let mut in_flight = self.shared.in_flight();
            let unfinished: Vec<(usize, String)> = in_flight
                .iter()
                .filter(|(_, held)| !held.settled)
                .map(|(key, _)| key.clone())
                .collect();
            unfinished
                .into_iter()
                .filter_map(|key| in_flight.remove(&key).map(|held| (key, held)))
                .collect()
        };
        // Released: set idle for another process to take at once. Not those another
        // process took over already (a release would take them back from it).
        let release: Vec<((usize, String), u32)> = left
            .iter()
            .filter(|(_, held)| !held.lost)
            .map(|(key, held)| (key.clone(), held.deliveries))
            .collect();
        let report = JobsReport {
            finished: self
                .running_at_stop
                .unwrap_or(0)
                .saturating_sub(left.len() as u64),
            left_pending: left.len() as u64,
        };
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let deadline = Instant::now() + 2 * self.shared.settings.io_timeout;
        let sent = self.shared.writer.send_deadline(
            writer::Command::Stop {
                release,
                done: done_tx,
            },
            deadline,
        );
        let flushed = sent.is_ok() && done.recv_deadline(deadline).is_ok();
        if let Some(writer) = self.writer.take() {
            if flushed {
                let _ = writer.join();
            }
        }
        if report.left_pending > 0 || !flushed {
            tracing::warn!(
                finished = report.finished,
                left_pending = report.left_pending,
                written = flushed,
                "durable jobs: shutdown deadline reached; unfinished jobs stay pending in \
                 Redis and run in another process or after the next start"
            );
        } else {
            tracing::info!(
                finished = report.finished,
                left_pending = 0,
                "durable jobs: drained"
            );
        }
        report
    }
}

impl Drop for DurableJobs {
    /// Without a [`DurableJobs::shutdown`]: stop reading and writing, without waiting.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.halt.store(true, Ordering::SeqCst);
        self.queue.inner.closed.store(true, Ordering::Release);
        if self.writer.is_some() {
            let (done, _) = crossbeam_channel::bounded(1);
            let _ = self.shared.writer.send(writer::Command::Stop {
                release: Vec::new(),
                done,
            });
        }
    }
}

/// `host:pid:random`: unique per process, and says where it ran.
fn consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let mut random = [0u8; 4];
    let _ = getrandom::fill(&mut random);
    format!(
        "{}:{}:{:08x}",
        if host.is_empty() { "host" } else { &host },
        std::process::id(),
        u32::from_be_bytes(random)
    )
}

/// How one run ended.
type Outcome = Result<(), String>;

/// What to do with an entry after a run: sans-IO, so that the rules are tested alone.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settle {
    /// Acknowledge and delete it.
    Done,
    /// Acknowledge it and put a copy in the retry set, due at `due_ms`.
    Retry { due_ms: u64, fields: Fields },
    /// Acknowledge it and add it to the dead-letter stream.
    Dead { fields: Fields },
}

/// Field-value pairs of a stream entry.
type Fields = Vec<(&'static str, Bytes)>;

/// What a read entry says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    id: String,
    payload: Bytes,
    /// Failed runs before this entry (0 for a fresh one).
    attempts: u32,
    /// The first entry's id.
    origin: String,
    error: Option<String>,
}

impl Entry {
    /// Parses the field-value pairs of stream entry `id`.
    fn parse(id: String, fields: &[redis::Value]) -> Self {
        let mut entry = Self {
            origin: id.clone(),
            id,
            payload: Bytes::new(),
            attempts: 0,
            error: None,
        };
        for pair in fields.chunks_exact(2) {
            let (redis::Value::BulkString(name), redis::Value::BulkString(value)) =
                (&pair[0], &pair[1])
            else {
                continue;
            };
            match name.as_slice() {
                b"payload" => entry.payload = Bytes::copy_from_slice(value),
                b"attempts" => {
                    entry.attempts = std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                }
                b"origin" => entry.origin = String::from_utf8_lossy(value).into_owned(),
                b"error" => entry.error = Some(String::from_utf8_lossy(value).into_owned()),
                _ => {}
            }
        }
        entry
    }
}

/// Decides what becomes of `entry` after run number `attempt` ended with `outcome`.
fn settle(
    settings: &JobSettings,
    job: &str,
    entry: &Entry,
    attempt: u32,
    outcome: &Outcome,
    consumer: &str,
    now_ms: u64,
) -> Settle {
    let Err(error) = outcome else {
        return Settle::Done;
    };
    let text = |s: String| Bytes::from(s.into_bytes());
    if attempt < settings.max_attempts {
        let due_ms = now_ms.saturating_add(settings.backoff(attempt).as_millis() as u64);
        return Settle::Retry {
            due_ms,
            fields: vec![
                ("payload", entry.payload.clone()),
                ("attempts", text(attempt.to_string())),
                ("origin", text(entry.origin.clone())),
                ("error", text(error.clone())),
            ],
        };
    }
    Settle::Dead {
        fields: vec![
            ("job", text(job.to_owned())),
            ("id", text(entry.id.clone())),
            ("origin", text(entry.origin.clone())),
            ("attempts", text(attempt.to_string())),
            ("error", text(error.clone())),
            ("payload", entry.payload.clone()),
            ("failed_at_ms", text(now_ms.to_string())),
            ("consumer", text(consumer.to_owned())),
        ],
    }
}

/// Field-value pairs as netstrings (`len:bytes,`), the retry set's member: opaque to
/// Redis, decoded by the promotion script. Unique per (origin, attempts).
fn netstrings(fields: &Fields) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        for part in [name.as_bytes(), value] {
            out.extend_from_slice(part.len().to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(part);
            out.push(b',');
        }
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Polls a handler's future, turning a panic into an error.
struct CatchUnwind(BoxFuture);

impl Future for CatchUnwind {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => Poll::Ready(Err(format!(
                "panicked: {}",
                super::panic_message(&*payload)
            ))),
        }
    }
}

/// At most one warning a second per kind.
struct RateLimit(Option<Instant>);

impl RateLimit {
    fn new() -> Self {
        Self(None)
    }

    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|last| now < last + Duration::from_secs(1))
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        let mut settings = JobSettings::new("redis://127.0.0.1");
        settings.retry_backoff = Duration::from_millis(100);
        let waits: Vec<u128> = (1..=4).map(|n| settings.backoff(n).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800]);
        assert_eq!(settings.backoff(60), MAX_BACKOFF);
        assert_eq!(settings.backoff(0).as_millis(), 100);
    }

    #[test]
    fn failures_retry_until_the_last_attempt_then_go_dead() {
        let mut settings = JobSettings::new("redis://127.0.0.1");
        settings.max_attempts = 2;
        let entry = Entry::parse("1-0".into(), &[]);
        let failed = Err("smtp 550".to_owned());
        assert_eq!(
            settle(&settings, "mail", &entry, 1, &Ok(()), "c", 0),
            Settle::Done
        );
        let Settle::Retry { due_ms, fields } =
            settle(&settings, "mail", &entry, 1, &failed, "c", 10)
        else {
            panic!("a first failure retries");
        };
        assert_eq!(due_ms, 1010);
        assert!(fields.contains(&("attempts", Bytes::from("1"))));
        assert!(fields.contains(&("origin", Bytes::from("1-0"))));
        let Settle::Dead { fields } = settle(&settings, "mail", &entry, 2, &failed, "c", 10) else {
            panic!("the last failure goes to the dead letters");
        };
        assert!(fields.contains(&("error", Bytes::from("smtp 550"))));
        assert!(fields.contains(&("attempts", Bytes::from("2"))));
    }

    #[test]
    fn retry_members_are_netstrings() {
        let fields: Fields = vec![
            ("payload", Bytes::from("a:b,")),
            ("attempts", Bytes::from("1")),
        ];
        assert_eq!(
            netstrings(&fields),
            b"7:payload,4:a:b,,8:attempts,1:1,".to_vec()
        );
    }

    #[test]
    fn names_and_settings_are_checked() {
        let mut registry = JobRegistry::default();
        registry.register("send_email", |_job| async { Ok::<(), String>(()) });
        registry.register("send_email", |_job| async { Ok::<(), String>(()) });
        assert!(registry.check().unwrap_err().contains("twice"));
        let mut registry = JobRegistry::default();
        registry.register("bad name", |_job| async { Ok::<(), String>(()) });
        assert!(registry.check().unwrap_err().contains("A-Z a-z 0-9"));
        let mut settings = JobSettings::new("redis://127.0.0.1");
        settings.prefix = "jobs:{x}:".into();
        assert!(settings.check().unwrap_err().contains("braces"));
    }

    #[test]
    fn settings_debug_hides_the_password() {
        for url in [
            "redis://user:s3cret@127.0.0.1:6379/0",
            "redis://s3cret@127.0.0.1",
            "redis+unix:///run/redis.sock?db=0&pass=s3cret",
        ] {
            let shown = format!("{:?}", JobSettings::new(url));
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn a_cluster_redis_url_is_not_used_for_jobs() {
        let mut config = Config {
            redis_url: "redis://127.0.0.1:7000,redis://127.0.0.1:7001".into(),
            redis_cluster: true,
            ..Config::default()
        };
        let err = JobSettings::from_config(&config).unwrap_err();
        assert!(
            err.contains("single Redis") && err.contains("jobs_redis_url"),
            "{err}"
        );
        config.jobs_redis_url = "redis://127.0.0.1:6379".into();
        let settings = JobSettings::from_config(&config).unwrap().unwrap();
        assert_eq!(settings.url, "redis://127.0.0.1:6379");
        config.redis_cluster = false;
        config.jobs_redis_url.clear();
        config.redis_url = "redis://127.0.0.1:6380".into();
        let settings = JobSettings::from_config(&config).unwrap().unwrap();
        assert_eq!(settings.url, "redis://127.0.0.1:6380");
    }

    #[test]
    fn an_enqueue_without_a_queue_says_why() {
        let executor = crate::tasks::Executor::start(1, 4).unwrap();
        let tasks = executor.handle();
        let result = futures_lite_block_on(tasks.enqueue("x", &1));
        assert_eq!(result, Err(EnqueueError::NotConfigured));
        executor.shutdown(Duration::from_secs(1));
    }

    fn futures_lite_block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }
}
