//! The executor: dedicated OS threads fed by a bounded `crossbeam-channel`.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

use super::metrics::TaskMetrics;

/// How often an executor thread with async jobs in flight looks for new jobs.
const ASYNC_TICK: Duration = Duration::from_millis(1);

/// Why a job was not queued. Either way it is counted in
/// `ringsocket_tasks_rejected_total` and logged with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpawnError {
    /// `task_queue_capacity` jobs are already queued (or reserved by requests whose
    /// response is being written).
    QueueFull,
    /// The executor is shutting down and takes no new jobs.
    ShuttingDown,
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull => f.write_str("background task queue full"),
            Self::ShuttingDown => f.write_str("background executor shutting down"),
        }
    }
}

impl std::error::Error for SpawnError {}

/// What [`Executor::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs that ran to the end (or panicked) after the shutdown started.
    pub finished: u64,
    /// Jobs that were queued but never started, or still running, at the deadline.
    pub abandoned: u64,
}

/// The executor threads. Created by [`Server::start`](crate::runtime::Server::start)
/// (or on its own, for a program without a server); stopped by [`Executor::shutdown`].
#[derive(Debug)]
pub struct Executor {
    handle: TaskHandle,
    /// Kept so that jobs left behind at shutdown can be counted.
    rx: Receiver<Message>,
    threads: Vec<JoinHandle<()>>,
}

impl Executor {
    /// Starts `threads` executor threads behind a queue of `capacity` jobs, at the
    /// scheduling priority of the calling thread.
    pub fn start(threads: usize, capacity: usize) -> io::Result<Self> {
        Self::start_with_nice(threads, capacity, None)
    }

    /// Like [`Executor::start`], with the threads' nice value set to `nice` (Linux
    /// gives each thread its own), so that where they share a CPU with an I/O core the
    /// scheduler favours the I/O core. A value the process may not set is logged and
    /// the threads keep the inherited priority.
    pub fn start_with_nice(threads: usize, capacity: usize, nice: Option<i32>) -> io::Result<Self> {
        let threads = threads.max(1);
        let capacity = capacity.max(1);
        // Room for the stop messages beside a full queue.
        let (tx, rx) = crossbeam_channel::bounded(capacity + threads);
        let shared = Arc::new(Shared {
            capacity,
            slots: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            last_warning: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: TaskMetrics::default(),
        });
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let rx = rx.clone();
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ringsocket-task{index}"))
                .spawn(move || {
                    if let Some(nice) = nice {
                        set_nice(index, nice);
                    }
                    run(index, rx, shared)
                })?;
            handles.push(thread);
        }
        Ok(Self {
            handle: TaskHandle { tx, shared },
            rx,
            threads: handles,
        })
    }

    /// A handle that queues jobs, for handlers and other threads.
    pub fn handle(&self) -> TaskHandle {
        self.handle.clone()
    }

    /// Stops taking jobs, lets the threads finish what is queued within `timeout`, and
    /// logs how many jobs finished and how many were abandoned. Threads still busy at
    /// the deadline are left to end with the process.
    pub fn shutdown(mut self, timeout: Duration) -> DrainReport {
        let shared = &self.handle.shared;
        let metrics = &shared.metrics;
        shared.closed.store(true, Ordering::SeqCst);
        let completed_before = metrics.completed();
        let deadline = Instant::now() + timeout;
        for _ in 0..self.threads.len() {
            if self
                .handle
                .tx
                .send_deadline(Message::Stop, deadline)
                .is_err()
            {
                break;
            }
        }
        while !self.threads.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut abandoned = 0;
        if self.threads.iter().all(JoinHandle::is_finished) {
            for thread in self.threads.drain(..) {
                let _ = thread.join();
            }
        } else {
            // Busy threads see this before each job and skip the rest of the queue.
            shared.abandon.store(true, Ordering::SeqCst);
            abandoned += metrics.running();
        }
        // Jobs queued behind the stop messages (a race with `closed`) or not reached in time.
        for message in self.rx.try_iter() {
            if let Message::Job(_) = message {
                shared.slots.fetch_sub(1, Ordering::AcqRel);
                metrics.unqueued();
                abandoned += 1;
            }
        }
        // Threads still busy took no stop message yet (or it was drained just now): one
        // each, so that they end when their job does.
        for _ in self.threads.iter().filter(|t| !t.is_finished()) {
            let _ = self.handle.tx.try_send(Message::Stop);
        }
        metrics.abandoned(abandoned);
        let report = DrainReport {
            finished: metrics.completed().saturating_sub(completed_before),
            abandoned,
        };
        if abandoned > 0 {
            tracing::warn!(
                finished = report.finished,
                abandoned = report.abandoned,
                timeout_secs = timeout.as_secs_f64(),
                "background tasks: shutdown timeout reached, jobs abandoned"
            );
        } else {
            tracing::info!(
                finished = report.finished,
                abandoned = 0,
                "background tasks drained"
            );
        }
        report
    }
}

impl Drop for Executor {
    /// Without a [`Executor::shutdown`]: take no more jobs and tell the threads to stop
    /// after what is queued, without waiting for them.
    fn drop(&mut self) {
        self.handle.shared.closed.store(true, Ordering::SeqCst);
        for _ in 0..self.threads.len() {
            let _ = self.handle.tx.try_send(Message::Stop);
        }
    }
}

/// Queues jobs on the executor. Cloneable and `Send`: give it to other threads, or to
/// a job that schedules the next one.
#[derive(Clone)]
pub struct TaskHandle {
    tx: Sender<Message>,
    shared: Arc<Shared>,
}

impl fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskHandle")
            .field("capacity", &self.shared.capacity)
            .field("taken", &self.shared.slots.load(Ordering::Relaxed))
            .finish()
    }
}

impl TaskHandle {
    /// Queues `job`, to run on an executor thread now. `name` names it in logs.
    pub fn spawn<F>(&self, name: impl Into<Cow<'static, str>>, job: F) -> Result<(), SpawnError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.queue(Job::sync(name.into(), job))
    }

    /// Queues a future, to be run on an executor thread (not on an I/O core).
    pub fn spawn_async<F>(
        &self,
        name: impl Into<Cow<'static, str>>,
        job: F,
    ) -> Result<(), SpawnError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.queue(Job::future(name.into(), job))
    }

    /// The executor's counters.
    pub fn metrics(&self) -> &TaskMetrics {
        &self.shared.metrics
    }

    /// The most jobs the queue holds (`task_queue_capacity`).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    pub(crate) fn queue(&self, job: Job) -> Result<(), SpawnError> {
        match self.reserve() {
            Ok(()) => {
                self.send_reserved(job);
                Ok(())
            }
            Err(e) => {
                self.refused(&job.name, e);
                Err(e)
            }
        }
    }

    /// Takes a place in the queue for a job to be sent later with
    /// [`TaskHandle::send_reserved`].
    pub(crate) fn reserve(&self) -> Result<(), SpawnError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::SeqCst) {
            return Err(SpawnError::ShuttingDown);
        }
        shared
            .slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < shared.capacity).then_some(taken + 1)
            })
            .map(|_| ())
            .map_err(|_| SpawnError::QueueFull)
    }

    /// Gives back a place taken by [`TaskHandle::reserve`] for a job that will not be sent.
    pub(crate) fn release(&self) {
        self.shared.slots.fetch_sub(1, Ordering::AcqRel);
    }

    /// Sends a job whose place was reserved. Never blocks.
    pub(crate) fn send_reserved(&self, mut job: Job) {
        let metrics = &self.shared.metrics;
        metrics.enqueued();
        job.queued_at = Instant::now();
        match self.tx.try_send(Message::Job(job)) {
            Ok(()) => {}
            // The reservation makes room in the channel; only the stop messages can
            // take it, when shutdown has begun.
            Err(TrySendError::Full(Message::Job(job)))
            | Err(TrySendError::Disconnected(Message::Job(job))) => {
                metrics.unqueued();
                self.release();
                self.refused(&job.name, SpawnError::ShuttingDown);
            }
            Err(_) => {}
        }
    }

    /// Counts and logs a refused job. Warnings are limited to one a second; the
    /// counter has every one.
    pub(crate) fn refused(&self, name: &str, why: SpawnError) {
        let shared = &self.shared;
        shared.metrics.rejected();
        let now = shared.epoch.elapsed().as_secs() + 1;
        let last = shared.last_warning.swap(now, Ordering::Relaxed);
        if last != now {
            tracing::warn!(
                job = name,
                reason = %why,
                capacity = shared.capacity,
                rejected_total = shared.metrics.rejected_total(),
                "background job refused"
            );
        }
    }
}

/// A job on its way to an executor thread.
pub(crate) struct Job {
    pub(crate) name: Cow<'static, str>,
    work: Work,
    queued_at: Instant,
}

impl Job {
    pub(crate) fn sync(name: Cow<'static, str>, job: impl FnOnce() + Send + 'static) -> Self {
        Self::new(name, Work::Sync(Box::new(job)))
    }

    pub(crate) fn future(
        name: Cow<'static, str>,
        job: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self::new(name, Work::Async(Box::pin(job)))
    }

    fn new(name: Cow<'static, str>, work: Work) -> Self {
        Self {
            name,
            work,
            queued_at: Instant::now(),
        }
    }
}

enum Work {
    Sync(Box<dyn FnOnce() + Send>),
    Async(Pin<Box<dyn Future<Output = ()> + Send>>),
}

enum Message {
    Job(Job),
    /// One per thread at shutdown, behind every job queued before it.
    Stop,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Job(job) => f.debug_tuple("Job").field(&job.name).finish(),
            Self::Stop => f.write_str("Stop"),
        }
    }
}

struct Shared {
    capacity: usize,
    /// Places taken: jobs in the channel plus places reserved by HTTP requests whose
    /// response is still being written. Never above `capacity`.
    slots: AtomicUsize,
    closed: AtomicBool,
    /// Set when the shutdown deadline passed: skip what is left.
    abandon: AtomicBool,
    /// The second (since `epoch`, plus one) of the last refusal warning.
    last_warning: AtomicU64,
    epoch: Instant,
    metrics: TaskMetrics,
}

/// One executor thread: runs jobs in queue order until it receives `Stop` and its async
/// jobs are done.
fn run(index: usize, rx: Receiver<Message>, shared: Arc<Shared>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(thread = index, error = %e, "executor thread cannot start its async runtime; it runs sync jobs only");
            run_without_runtime(index, &rx, &shared);
            return;
        }
    };
    // Timers and I/O of async jobs find the runtime from anywhere on this thread.
    let _context = runtime.enter();
    let local = tokio::task::LocalSet::new();
    let in_flight = Rc::new(Cell::new(0usize));
    let mut stopping = false;
    loop {
        let message = if in_flight.get() == 0 {
            if stopping {
                break;
            }
            match rx.recv() {
                Ok(message) => message,
                Err(_) => break,
            }
        } else {
            if stopping && shared.abandon.load(Ordering::SeqCst) {
                break;
            }
            match rx.try_recv() {
                Ok(message) => message,
                Err(TryRecvError::Empty) => {
                    runtime.block_on(local.run_until(tokio::time::sleep(ASYNC_TICK)));
                    continue;
                }
                Err(TryRecvError::Disconnected) => {
                    stopping = true;
                    runtime.block_on(local.run_until(tokio::time::sleep(ASYNC_TICK)));
                    continue;
                }
            }
        };
        let job = match message {
            Message::Stop => {
                stopping = true;
                continue;
            }
            Message::Job(job) => job,
        };
        shared.slots.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.dequeued(job.queued_at.elapsed());
        if shared.abandon.load(Ordering::SeqCst) {
            continue;
        }
        let Job { name, work, .. } = job;
        match work {
            Work::Sync(f) => run_sync(index, &name, f, &shared.metrics),
            Work::Async(future) => {
                shared.metrics.started();
                in_flight.set(in_flight.get() + 1);
                let in_flight = in_flight.clone();
                let shared = shared.clone();
                local.spawn_local(async move {
                    let outcome = tokio::task::spawn_local(future).await;
                    shared.metrics.finished(outcome.is_ok());
                    if let Err(e) = outcome {
                        let message = if e.is_panic() {
                            panic_message(&*e.into_panic())
                        } else {
                            "cancelled".to_owned()
                        };
                        tracing::error!(thread = index, job = %name, panic = %message, "background job panicked");
                    }
                    in_flight.set(in_flight.get() - 1);
                });
            }
        }
    }
    tracing::debug!(thread = index, "executor thread stopped");
}

/// The loop of a thread whose async runtime could not be built: async jobs fail.
fn run_without_runtime(index: usize, rx: &Receiver<Message>, shared: &Shared) {
    while let Ok(Message::Job(job)) = rx.recv() {
        shared.slots.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.dequeued(job.queued_at.elapsed());
        match job.work {
            Work::Sync(f) => run_sync(index, &job.name, f, &shared.metrics),
            Work::Async(_) => {
                shared.metrics.started();
                shared.metrics.finished(false);
                tracing::error!(thread = index, job = %job.name, "async background job dropped: no async runtime on this thread");
            }
        }
    }
}

fn run_sync(index: usize, name: &str, f: Box<dyn FnOnce() + Send>, metrics: &TaskMetrics) {
    metrics.started();
    let outcome = catch_unwind(AssertUnwindSafe(f));
    metrics.finished(outcome.is_ok());
    if let Err(payload) = outcome {
        tracing::error!(thread = index, job = %name, panic = %panic_message(&*payload), "background job panicked");
    }
}

/// Sets the calling thread's nice value (on Linux `setpriority(PRIO_PROCESS, 0, …)`
/// applies to the calling thread only).
fn set_nice(index: usize, nice: i32) {
    // SAFETY: setpriority(2) reads only its integer arguments.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if result != 0 {
        tracing::warn!(thread = index, nice, error = %io::Error::last_os_error(), "cannot set the executor thread's nice value");
    }
}

/// The text of a panic's payload, when it is a string.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}
