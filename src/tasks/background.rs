//! `BackgroundTasks`: the jobs one request (or one WebSocket) schedules.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use super::executor::{Job, SpawnError, TaskHandle};
use super::jobs::{Ack, Enqueue};

/// What an HTTP request gets when the background queue is full. Chosen per app
/// (`App::queue_full_policy`); the refused job is counted and logged either way. A
/// durable enqueue ([`BackgroundTasks::enqueue`]) that fails makes the answer 503
/// (or 500) under either policy: a 202 would say the job is in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueFullPolicy {
    /// Answer 503 with `Retry-After: 1` instead of the handler's response, and drop
    /// the request's other jobs: the client learns that its work was not taken, and may
    /// retry (the default).
    #[default]
    Reject503,
    /// Keep the handler's response and drop only the refused job.
    Drop,
}

/// The background jobs of one HTTP request or one WebSocket connection, FastAPI's
/// `BackgroundTasks`. Lives on the connection's core (`!Send`); use
/// [`BackgroundTasks::handle`] to schedule from other threads.
///
/// For an HTTP request, jobs start after the response has been written; for a
/// WebSocket, at once. `add` tells at once whether the job was taken.
#[derive(Clone)]
pub struct BackgroundTasks {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    /// A WebSocket's: each job goes to the queue as it is added, so there is nothing to
    /// hold but the handle (and no allocation per connection).
    Immediate(TaskHandle),
    /// An HTTP request's: jobs held until the response is written.
    Deferred(Rc<Inner>),
}

struct Inner {
    handle: TaskHandle,
    policy: Cell<QueueFullPolicy>,
    /// Jobs with a reserved place in the queue, waiting for the response.
    pending: RefCell<Vec<Job>>,
    refused: Cell<usize>,
    /// The request's durable enqueues: its response waits for their answers.
    acks: RefCell<Vec<Arc<Ack>>>,
}

/// Why an HTTP request is answered with an error in place of its handler's response
/// ([`BackgroundTasks::refusal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 503 (with `Retry-After: 1`) when a retry may succeed, else 500.
    pub status: u16,
    /// What was refused, for the body and the log.
    pub reason: String,
}

impl fmt::Debug for BackgroundTasks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("BackgroundTasks");
        match &self.repr {
            Repr::Immediate(_) => f.field("deferred", &false),
            Repr::Deferred(inner) => f
                .field("deferred", &true)
                .field("policy", &inner.policy.get())
                .field("pending", &inner.pending.borrow().len())
                .field("refused", &inner.refused.get()),
        }
        .finish()
    }
}

impl BackgroundTasks {
    /// Jobs held until [`BackgroundTasks::commit`], for an HTTP request.
    pub fn deferred(handle: TaskHandle) -> Self {
        Self {
            repr: Repr::Deferred(Rc::new(Inner {
                handle,
                policy: Cell::new(QueueFullPolicy::default()),
                pending: RefCell::new(Vec::new()),
                refused: Cell::new(0),
                acks: RefCell::new(Vec::new()),
            })),
        }
    }

    /// Jobs queued as they are added, for a WebSocket connection.
    pub fn immediate(handle: TaskHandle) -> Self {
        Self {
            repr: Repr::Immediate(handle),
        }
    }

    /// Schedules `job` (a closure run on an executor thread); `name` names it in logs.
    /// `Err` when the queue is full or the server is shutting down: the job will not
    /// run (and for an HTTP request under [`QueueFullPolicy::Reject503`], the response
    /// will be 503).
    pub fn add<F>(&self, name: impl Into<Cow<'static, str>>, job: F) -> Result<(), SpawnError>
    where
        F: FnOnce() + Send + 'static,
    {
        self.push(Job::sync(name.into(), job))
    }

    /// Schedules a future, run on an executor thread's async runtime (for jobs that
    /// wait on I/O), never on the I/O core.
    pub fn add_async<F>(&self, name: impl Into<Cow<'static, str>>, job: F) -> Result<(), SpawnError>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.push(Job::future(name.into(), job))
    }

    /// Enqueues the durable job `name` with `payload` as JSON: it is in Redis (and
    /// survives a restart) once the returned future resolves `Ok`, and runs in any
    /// process whose app registers `name` (see [`super::jobs`]). An HTTP request's
    /// response waits for the answer even if the future is not awaited; when Redis did
    /// not take the job, the request is answered 503 with `Retry-After: 1` instead
    /// (under [`QueueFullPolicy::Reject503`], the default).
    pub fn enqueue<T: serde::Serialize + ?Sized>(&self, name: &str, payload: &T) -> Enqueue {
        self.track(self.handle_ref().enqueue(name, payload))
    }

    /// [`BackgroundTasks::enqueue`] with the payload as it is.
    pub fn enqueue_bytes(&self, name: &str, payload: impl Into<bytes::Bytes>) -> Enqueue {
        self.track(self.handle_ref().enqueue_bytes(name, payload))
    }

    fn track(&self, enqueue: Enqueue) -> Enqueue {
        if let Repr::Deferred(inner) = &self.repr {
            inner.track(enqueue.ack());
        }
        enqueue
    }

    /// Runs `f` (one poll of the request's handler) with this request as the current
    /// one on this thread: a durable enqueue made through a [`TaskHandle`] meanwhile
    /// ([`TaskHandle::enqueue`]) is the request's too, and its response waits for it.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let Repr::Deferred(inner) = &self.repr else {
            return f();
        };
        struct Restore(Option<Rc<Inner>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                CURRENT.with(|current| *current.borrow_mut() = previous);
            }
        }
        let previous = CURRENT.with(|current| current.borrow_mut().replace(inner.clone()));
        let _restore = Restore(previous);
        f()
    }

    fn handle_ref(&self) -> &TaskHandle {
        match &self.repr {
            Repr::Immediate(handle) => handle,
            Repr::Deferred(inner) => &inner.handle,
        }
    }

    /// Waits until Redis has answered every durable enqueue of the request. The
    /// runtime awaits it before it writes the response.
    pub async fn settle(&self) {
        let Repr::Deferred(inner) = &self.repr else {
            return;
        };
        let acks: Vec<Arc<Ack>> = inner.acks.borrow().clone();
        for ack in acks {
            let _ = ack.wait().await;
        }
    }

    /// Whether the request must be answered with an error instead of its handler's
    /// response, and which: a job refused by a full queue, or a durable enqueue that
    /// failed, under [`QueueFullPolicy::Reject503`]. Call after
    /// [`BackgroundTasks::settle`].
    pub fn refusal(&self) -> Option<Refusal> {
        let Repr::Deferred(inner) = &self.repr else {
            return None;
        };
        // A durable job that is not in Redis: whatever the policy, the answer must
        // not say it was taken.
        let durable = inner.acks.borrow().iter().find_map(|ack| match ack.get() {
            Some(Err(e)) => Some(Refusal {
                status: if e.is_transient() { 503 } else { 500 },
                reason: e.to_string(),
            }),
            _ => None,
        });
        if durable.is_some() {
            return durable;
        }
        if inner.policy.get() == QueueFullPolicy::Reject503 && inner.refused.get() > 0 {
            return Some(Refusal {
                status: 503,
                reason: SpawnError::QueueFull.to_string(),
            });
        }
        None
    }

    /// A `Send` handle on the executor, for other threads and for jobs that schedule
    /// more jobs (those start at once).
    pub fn handle(&self) -> TaskHandle {
        match &self.repr {
            Repr::Immediate(handle) => handle.clone(),
            Repr::Deferred(inner) => inner.handle.clone(),
        }
    }

    /// Sets the queue-full policy (the app does, before the handler runs). Only an
    /// HTTP request's jobs have a response to answer 503 with; a WebSocket's are
    /// refused one by one whatever the policy.
    pub fn set_policy(&self, policy: QueueFullPolicy) {
        if let Repr::Deferred(inner) = &self.repr {
            inner.policy.set(policy);
        }
    }

    /// Whether a job was refused and the policy is to answer with an error (see
    /// [`BackgroundTasks::refusal`]).
    pub fn must_reject(&self) -> bool {
        self.refusal().is_some()
    }

    /// Jobs waiting for the response to be written.
    pub fn pending(&self) -> usize {
        match &self.repr {
            Repr::Immediate(_) => 0,
            Repr::Deferred(inner) => inner.pending.borrow().len(),
        }
    }

    /// Hands the held jobs to the executor. The runtime calls it once the response has
    /// been written.
    pub fn commit(&self) {
        let Repr::Deferred(inner) = &self.repr else {
            return;
        };
        let jobs = std::mem::take(&mut *inner.pending.borrow_mut());
        for job in jobs {
            inner.handle.send_reserved(job);
        }
    }

    /// Drops the held jobs (the request was answered 503, or its handler panicked),
    /// counting each as rejected and saying so in one log line.
    pub fn discard(&self, why: &str) {
        let Repr::Deferred(inner) = &self.repr else {
            return;
        };
        let jobs = std::mem::take(&mut *inner.pending.borrow_mut());
        if jobs.is_empty() {
            return;
        }
        let names: Vec<&str> = jobs.iter().map(|job| job.name.as_ref()).collect();
        tracing::warn!(jobs = ?names, reason = why, "background jobs dropped");
        for _ in &jobs {
            inner.handle.release();
            inner.handle.metrics().rejected();
        }
    }

    fn push(&self, job: Job) -> Result<(), SpawnError> {
        let inner = match &self.repr {
            Repr::Immediate(handle) => return handle.queue(job),
            Repr::Deferred(inner) => inner,
        };
        match inner.handle.reserve() {
            Ok(()) => {
                inner.pending.borrow_mut().push(job);
                Ok(())
            }
            Err(e) => {
                inner.refused.set(inner.refused.get() + 1);
                inner.handle.refused(&job.name, e);
                Err(e)
            }
        }
    }
}

thread_local! {
    /// The HTTP request whose handler this thread is polling (see
    /// [`BackgroundTasks::scope`]).
    static CURRENT: RefCell<Option<Rc<Inner>>> = const { RefCell::new(None) };
}

/// Makes `enqueue` (made through a [`TaskHandle`]) part of the HTTP request whose
/// handler this thread is polling, if any.
pub(crate) fn track_current(enqueue: &Enqueue) {
    let current = CURRENT.with(|current| current.borrow().clone());
    if let Some(inner) = current {
        inner.track(enqueue.ack());
    }
}

impl Inner {
    fn track(&self, ack: Arc<Ack>) {
        let mut acks = self.acks.borrow_mut();
        if !acks.iter().any(|a| Arc::ptr_eq(a, &ack)) {
            acks.push(ack);
        }
    }
}

impl Drop for Inner {
    /// Jobs still held when the request goes away (its connection was torn down while
    /// the response was being written) are queued rather than lost: the handler
    /// committed to them.
    fn drop(&mut self) {
        for job in self.pending.get_mut().drain(..) {
            self.handle.send_reserved(job);
        }
    }
}
