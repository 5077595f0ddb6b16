//! The executor: dedicated OS threads fed by a bounded `crossbeam-channel`.
//!
//! A thread with no async job in flight blocks in the channel's `recv`. A thread with
//! async jobs in flight runs them on its tokio runtime until it is woken, with no
//! timer: each thread has a [`Notify`] in [`Shared`], and every send into the channel
//! (a job, a stop message) and the shutdown's `abandon` flag are followed by a
//! `notify_one` on every thread's `Notify`; the thread's own last async job, when it
//! ends, notifies it too. See [`run`] for why no wake-up is lost.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tokio::sync::Notify;

use super::jobs::{Enqueue, EnqueueError, JobQueue};
use super::metrics::TaskMetrics;

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
        let shared = Arc::new(Shared::new(capacity, threads));
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
            shared.wake_threads();
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
            shared.wake_threads();
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
        shared.wake_threads();
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
        self.handle.shared.wake_threads();
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

    /// Enqueues the durable job `name` with `payload` as JSON (see [`super::jobs`]):
    /// the returned future resolves once Redis has it. Fails with
    /// [`EnqueueError::NotConfigured`] when the app registers no durable job.
    ///
    /// Called while an HTTP handler runs (on its I/O core), the enqueue belongs to
    /// that request as with [`BackgroundTasks::enqueue`](super::BackgroundTasks::enqueue):
    /// the response waits for it, and is 503 if Redis did not take the job.
    pub fn enqueue<T: serde::Serialize + ?Sized>(&self, name: &str, payload: &T) -> Enqueue {
        let enqueue = match self.jobs() {
            Some(queue) => queue.enqueue(name, payload),
            None => Enqueue::failed(EnqueueError::NotConfigured),
        };
        super::background::track_current(&enqueue);
        enqueue
    }

    /// [`TaskHandle::enqueue`] with the payload as it is.
    pub fn enqueue_bytes(&self, name: &str, payload: impl Into<bytes::Bytes>) -> Enqueue {
        let enqueue = match self.jobs() {
            Some(queue) => queue.enqueue_bytes(name, payload),
            None => Enqueue::failed(EnqueueError::NotConfigured),
        };
        super::background::track_current(&enqueue);
        enqueue
    }

    /// The durable job queue, once the server started one.
    pub fn jobs(&self) -> Option<&JobQueue> {
        self.shared.jobs.get()
    }

    /// Makes [`TaskHandle::enqueue`] use `queue` (the server does, when the app
    /// registers jobs). `false` if a queue was attached already.
    pub fn attach_jobs(&self, queue: JobQueue) -> bool {
        self.shared.jobs.set(queue).is_ok()
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

    /// Sends a job whose place was reserved, then wakes the executor threads that wait
    /// on async jobs (a thread blocked in `recv` is woken by the channel). Never blocks.
    pub(crate) fn send_reserved(&self, mut job: Job) {
        let metrics = &self.shared.metrics;
        metrics.enqueued();
        job.queued_at = Instant::now();
        match self.tx.try_send(Message::Job(job)) {
            Ok(()) => self.shared.wake_threads(),
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
    /// One per executor thread, by index: what the thread waits on while it has async
    /// jobs in flight. Notified after every send into the channel and after `abandon`
    /// is set ([`Shared::wake_threads`]), and by the thread's own last async job when it
    /// ends.
    wake: Box<[Notify]>,
    /// The durable job queue, when there is one.
    jobs: OnceLock<JobQueue>,
}

impl Shared {
    fn new(capacity: usize, threads: usize) -> Self {
        Self {
            capacity,
            slots: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            last_warning: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: TaskMetrics::default(),
            wake: (0..threads).map(|_| Notify::new()).collect(),
            jobs: OnceLock::new(),
        }
    }

    /// Wakes every executor thread that waits on its async jobs, or, for one that does
    /// not wait now, stores a permit that ends its next wait at once (at worst one
    /// extra look at an empty channel). Called after the send or the store it announces.
    /// Every thread, not one: a `notify_one` on a shared `Notify` could go to a thread
    /// that is about to run a long sync job while another sits idle.
    fn wake_threads(&self) {
        for wake in &self.wake {
            wake.notify_one();
        }
    }
}

/// One executor thread: runs jobs in queue order until it receives `Stop` (or every
/// sender is gone) and its async jobs are done.
///
/// With no async job in flight it blocks in `rx.recv()`. With some in flight it takes
/// what the channel has with `try_recv`, and when that finds it empty it runs the
/// async jobs until its `Notify` (`shared.wake[index]`) fires: a sender sends, then
/// notifies; the loop looks at the channel, then waits. `notify_one` stores a permit
/// when the thread is not yet waiting, so a send that comes after the empty
/// `try_recv` always ends the wait that follows it. Whenever the loop looks at
/// `abandon` the same holds (the store, then the notify). The wrapper of each async
/// job notifies the thread when the last one in flight ends, so that it goes back to
/// `recv`, or stops. When every sender is gone (`Disconnected`) the thread is
/// stopping: it runs the jobs in flight until the last one ends, and is woken only
/// then (or for `abandon`), never by a timer.
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
    let wake = &shared.wake[index];
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
                Err(empty_or_gone) => {
                    // Gone: no job or stop message can come; the jobs in flight end
                    // the wait when the last one does.
                    stopping |= empty_or_gone == TryRecvError::Disconnected;
                    runtime.block_on(local.run_until(wake.notified()));
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
                    if in_flight.get() == 0 {
                        shared.wake[index].notify_one();
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    use crossbeam_channel::{bounded, unbounded};
    use tokio::sync::oneshot;

    /// The longest any single wait may take before the test fails.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// How long a test leaves an executor thread waiting on an async job before it
    /// counts the thread's wake-ups. A thread polling with a 1 ms sleep wakes some 90
    /// to 100 times over it (tokio's timer rounds the sleep up to about 2 ms), fewer
    /// only on a machine too loaded to run it.
    const HOLD: Duration = Duration::from_millis(200);

    /// The most wake-ups (voluntary context switches) a waiting thread may have over
    /// `HOLD`. Woken only by sends, it has none; a few are allowed for what the
    /// kernel or the allocator may do.
    const MOST_WAKE_UPS: u64 = 20;

    /// An async job in flight, waiting on a job queued after it: the thread takes the
    /// second job while the first waits, and both end.
    #[test]
    fn a_job_queued_while_an_async_job_waits_is_taken() {
        let executor = Executor::start(1, 16).unwrap();
        let tasks = executor.handle();
        let (done_tx, done) = unbounded();
        let (release, wait) = oneshot::channel::<()>();
        let (started_tx, started) = bounded(1);
        let first_done = done_tx.clone();
        tasks
            .spawn_async("waits", async move {
                started_tx.send(()).unwrap();
                let _ = wait.await;
                first_done.send("first").unwrap();
            })
            .unwrap();
        started.recv_timeout(PATIENCE).unwrap();
        let second_done = done_tx.clone();
        tasks
            .spawn_async("releases", async move {
                release.send(()).unwrap();
                second_done.send("second").unwrap();
            })
            .unwrap();
        tasks
            .spawn("sync", move || done_tx.send("sync").unwrap())
            .unwrap();
        let mut ended: Vec<_> = (0..3)
            .map(|_| done.recv_timeout(PATIENCE).unwrap())
            .collect();
        ended.sort_unstable();
        assert_eq!(ended, ["first", "second", "sync"]);
        let report = executor.shutdown(PATIENCE);
        assert_eq!(report.abandoned, 0, "{report:?}");
        assert_eq!(tasks.metrics().done(), 3);
        assert_eq!(tasks.metrics().running(), 0);
    }

    /// A thread whose only job is an async one waiting on a channel sleeps until the
    /// channel delivers: it does not wake up to look at its queue (a polling loop
    /// would, about once per millisecond), and it takes no CPU.
    #[test]
    fn a_thread_waiting_on_an_async_job_sleeps_until_woken() {
        let executor = Executor::start(1, 16).unwrap();
        let tasks = executor.handle();
        let tid = executor_tid(&tasks);
        let (release, done) = waiting_job(&tasks, "waits");
        let (wake_ups, cpu) = idle_for(tid, HOLD);
        release.send(()).unwrap();
        done.recv_timeout(PATIENCE).unwrap();
        assert!(wake_ups <= MOST_WAKE_UPS, "{wake_ups} wake-ups in {HOLD:?}");
        assert!(cpu < HOLD / 2, "{cpu:?} of CPU in {HOLD:?}");
        // And a job queued now is still taken at once.
        let (ran_tx, ran) = bounded(1);
        tasks
            .spawn("after", move || ran_tx.send(()).unwrap())
            .unwrap();
        ran.recv_timeout(PATIENCE).unwrap();
        let report = executor.shutdown(PATIENCE);
        assert_eq!(report.abandoned, 0, "{report:?}");
    }

    /// Every sender gone while an async job waits: the thread neither spins nor
    /// polls while the job waits, and ends when the job does (no stop message).
    #[test]
    fn with_every_sender_gone_the_thread_ends_with_its_last_async_job() {
        let shared = Arc::new(Shared::new(4, 1));
        let (tx, rx) = bounded(5);
        let tasks = TaskHandle {
            tx,
            shared: shared.clone(),
        };
        let (ended_tx, ended) = bounded(1);
        let thread_shared = shared.clone();
        let thread = std::thread::spawn(move || {
            run(0, rx, thread_shared);
            ended_tx.send(()).unwrap();
        });
        let tid = executor_tid(&tasks);
        let (release, done) = waiting_job(&tasks, "waits");
        drop(tasks);
        // Woken once with no sender left, the thread sees `Disconnected`.
        shared.wake_threads();
        let (wake_ups, cpu) = idle_for(tid, HOLD);
        assert_eq!(ended.try_recv(), Err(TryRecvError::Empty));
        release.send(()).unwrap();
        done.recv_timeout(PATIENCE).unwrap();
        ended.recv_timeout(PATIENCE).unwrap();
        thread.join().unwrap();
        assert!(wake_ups <= MOST_WAKE_UPS, "{wake_ups} wake-ups in {HOLD:?}");
        assert!(cpu < HOLD / 2, "{cpu:?} of CPU in {HOLD:?}");
        assert_eq!(shared.metrics.done(), 2);
    }

    /// Shutdown while an async job waits on a channel: the stop message wakes the
    /// thread, which keeps running the job, and the thread ends as soon as the job
    /// does (long before the deadline).
    #[test]
    fn shutdown_drains_an_async_job_waiting_on_a_channel() {
        let executor = Executor::start(1, 16).unwrap();
        let tasks = executor.handle();
        let (release, done) = waiting_job(&tasks, "waits");
        let rx = executor.rx.clone();
        let timeout = 4 * PATIENCE;
        let shutdown = std::thread::spawn(move || executor.shutdown(timeout));
        let deadline = Instant::now() + PATIENCE;
        while tasks.spawn("probe", || {}) != Err(SpawnError::ShuttingDown) {
            assert!(Instant::now() < deadline, "shutdown never started");
            std::thread::yield_now();
        }
        // The stop message follows at once; give the thread time to take it, so that
        // the job ends on a stopping thread. (Were it slower than that, the job would
        // end first and the thread would take the stop message from `recv`: the test
        // would still pass, on the other path.)
        let deadline = Instant::now() + PATIENCE;
        while !rx.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the stop message was never taken"
            );
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(50));
        let released = Instant::now();
        release.send(()).unwrap();
        done.recv_timeout(PATIENCE).unwrap();
        let report = shutdown.join().unwrap();
        let took = released.elapsed();
        assert_eq!(report.abandoned, 0, "{report:?}");
        // The job, and any probe queued before the shutdown began.
        assert!(report.finished >= 1, "{report:?}");
        // Generous: a thread that missed the end of its job would hold shutdown to
        // its deadline, four times this.
        assert!(
            took < PATIENCE,
            "shutdown took {took:?} after the job ended"
        );
    }

    /// An async job still waiting at the shutdown deadline is abandoned: `abandon`
    /// wakes its thread, which stops and drops the job (here its sender, which the
    /// test sees disconnect) instead of waiting for it.
    #[test]
    fn shutdown_abandons_an_async_job_still_waiting_at_the_deadline() {
        let executor = Executor::start(1, 16).unwrap();
        let tasks = executor.handle();
        let (_release, done) = waiting_job(&tasks, "waits-forever");
        let report = executor.shutdown(Duration::from_millis(100));
        assert_eq!(
            report,
            DrainReport {
                finished: 0,
                abandoned: 1
            }
        );
        assert_eq!(
            done.recv_timeout(PATIENCE),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
    }

    /// The kernel's id of the executor thread behind `tasks` (the only one).
    fn executor_tid(tasks: &TaskHandle) -> u32 {
        let (tx, rx) = bounded(1);
        tasks
            .spawn("tid", move || {
                let link = std::fs::read_link("/proc/thread-self").unwrap();
                let tid = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
                tx.send(tid).unwrap();
            })
            .unwrap();
        rx.recv_timeout(PATIENCE).unwrap()
    }

    /// Sleeps for `hold` and returns how many times thread `tid` went to sleep and
    /// woke up meanwhile (its voluntary context switches) and the CPU it used.
    /// Queues an async job that waits until the returned sender sends (or is dropped),
    /// then reports on the returned receiver; returns once the job has started.
    fn waiting_job(
        tasks: &TaskHandle,
        name: &'static str,
    ) -> (oneshot::Sender<()>, crossbeam_channel::Receiver<()>) {
        let (release, wait) = oneshot::channel::<()>();
        let (started_tx, started) = bounded(1);
        let (done_tx, done) = bounded(1);
        tasks
            .spawn_async(name, async move {
                started_tx.send(()).unwrap();
                let _ = wait.await;
                let _ = done_tx.send(());
            })
            .unwrap();
        started.recv_timeout(PATIENCE).unwrap();
        (release, done)
    }

    fn idle_for(tid: u32, hold: Duration) -> (u64, Duration) {
        let (switches, ticks) = thread_stats(tid);
        std::thread::sleep(hold);
        let (switches_after, ticks_after) = thread_stats(tid);
        // SAFETY: sysconf(3) reads only its integer argument.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u64::try_from(hz).unwrap().max(1);
        let cpu = Duration::from_millis((ticks_after - ticks) * 1000 / hz);
        (switches_after - switches, cpu)
    }

    /// Thread `tid`'s voluntary context switches and its user plus system time in
    /// clock ticks, from `/proc`.
    fn thread_stats(tid: u32) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        let switches = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // After the command name in parentheses: field 3 (state) onwards; utime and
        // stime are fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        (switches, ticks)
    }
}
