//! Background tasks, FastAPI style, that never run on an I/O core.
//!
//! A handler schedules work with [`BackgroundTasks::add`] (a `FnOnce() + Send`
//! closure) or [`BackgroundTasks::add_async`] (a `Send` future that waits on I/O). The
//! work runs on the [`Executor`]'s own OS threads (`task_threads`, default 1), fed by a
//! bounded `crossbeam-channel` (`task_queue_capacity`, default 10,000 jobs). The I/O
//! cores only ever `try_send`; they never wait for the executor.
//!
//! - Jobs scheduled by an HTTP handler are held by the request and handed to the
//!   executor only after the response has been fully written to the socket (they run
//!   even if that write failed: the handler has committed to them). Their place in the
//!   queue is reserved when they are added, so a full queue is known while the handler
//!   still runs.
//! - Jobs scheduled by a WebSocket handler (or any [`TaskHandle`]) are queued at once.
//! - Queue full: `add` returns [`SpawnError::QueueFull`], the job is counted in
//!   `ringsocket_tasks_rejected_total` and logged with its name. For HTTP requests the
//!   app's [`QueueFullPolicy`] decides the rest: [`QueueFullPolicy::Reject503`] (the
//!   default) answers the request with 503 and `Retry-After: 1` instead of the
//!   handler's response, and drops the request's other jobs; [`QueueFullPolicy::Drop`]
//!   keeps the handler's response and drops only the refused job.
//! - A job that panics is caught, logged with its name and counted as failed; the
//!   executor thread goes on with the next job.
//! - Shutdown ([`Executor::shutdown`]): no new jobs are taken, the queue is drained
//!   within the deadline, and one log line says how many finished and how many were
//!   abandoned.
//!
//! These jobs live in memory: lost with the process, abandoned at the shutdown
//! deadline. [`jobs`] is the durable kind: named jobs with a payload, kept in Redis
//! Streams until they ran (at least once, with retries and a dead-letter stream),
//! enqueued with [`BackgroundTasks::enqueue`] and registered with
//! [`App::job`](crate::app::App::job).
//!
//! Async jobs run on a current-thread tokio runtime owned by each executor thread. While
//! one is waiting, the thread sleeps until a job (or the shutdown) is sent to the queue
//! or its last async job ends, with no polling timer; a sync job runs to completion
//! before the thread polls async jobs again.

mod background;
mod executor;
pub mod jobs;
mod metrics;

pub use background::{BackgroundTasks, QueueFullPolicy, Refusal};
pub(crate) use executor::panic_message;
pub use executor::{DrainReport, Executor, SpawnError, TaskHandle};
pub use metrics::TaskMetrics;
