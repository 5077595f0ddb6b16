//! This core's io_uring: the ring, the operations in flight on it, and when they reach
//! the kernel. Written here on the `io-uring` crate, under the worker's tokio
//! current-thread runtime, so that the core decides when to submit.
//!
//! ```text
//!  task ── Op::submit ──▶ submission queue ──(driver task: submit)──▶ kernel
//!   ▲                                                                  │
//!   └── waker ◀── slot ◀──(driver task, or `tick`: reap)── completion queue ◀┘
//! ```
//!
//! Call order, per core: [`Ring::new`] builds the ring (an error names the cause), then
//! [`Ring::start`] makes it this thread's ring and spawns its driver task on the
//! current `LocalSet`; operations ([`Op`], used by [`net`]) are created by the core's
//! tasks; [`tick`] may be called by a task that runs for long (the flusher); at the end,
//! [`teardown`] cancels what is still in flight and waits for it before the buffers
//! go.
//!
//! When operations are submitted: the first operation queued since the last submission
//! wakes the driver task, which runs after the tasks already scheduled in this turn of
//! the core and hands everything they queued to the kernel in one `io_uring_enter`.
//! Nothing waits for the thread to park: a core that never runs out of work (a long
//! broadcast, a handler that keeps yielding) still submits every turn. Completions are
//! taken when the ring's descriptor polls readable (tokio's reactor, the same one the
//! core's timers use) or when a long-running task calls [`tick`].

pub(crate) mod net;

use std::any::Any;
use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue};
use slab::Slab;
use tokio::io::unix::AsyncFd;

/// An operation's `user_data` for the cancellations [`teardown`] submits; their own
/// completions carry nothing to deliver.
const CANCEL: u64 = u64::MAX;

/// Completion queue entries of a worker's ring: a core has a read in flight per
/// connection, and a burst (a heartbeat round over 10,000 connections, answered at
/// once) completes many together; what does not fit waits in the kernel (see
/// [`Ring::reap`]). 16 bytes each.
const CQ_ENTRIES: u32 = 16_384;

/// Rounds of overflowed completions one [`Ring::reap`] takes before it lets the core
/// go on (the rest come at the next reap).
const MAX_OVERFLOW_FLUSHES: usize = 16;

/// How long [`teardown`] waits for cancelled operations to complete.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

thread_local! {
    static RING: RefCell<Option<Ring>> = const { RefCell::new(None) };
}

/// One io_uring instance and the operations in flight on it.
pub(crate) struct Ring {
    uring: IoUring,
    ops: Slab<Slot>,
    /// Operations queued and not yet handed to the kernel.
    unsubmitted: bool,
    /// The driver task, waiting for operations to submit.
    driver: Option<Waker>,
}

/// Where an operation in flight stands.
enum Slot {
    /// Queued or in the kernel; no task has polled it yet.
    Submitted,
    /// Queued or in the kernel, polled by the task this wakes.
    Waiting(Waker),
    /// Its completion's result (`res`: a count or `-errno`), not yet taken.
    Completed(i32),
    /// Its future was dropped; this keeps what the kernel may still write to or read
    /// from (buffers, the socket) alive until the completion arrives.
    Ignored(#[allow(dead_code)] Box<dyn Any>),
}

impl Ring {
    /// A ring with `entries` submission queue entries; completions run as task work
    /// when the thread next enters the kernel instead of interrupting it
    /// (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19) where the kernel has it.
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        Self::with_completions(entries, CQ_ENTRIES.max(entries.saturating_mul(2)))
    }

    /// A ring with `entries` submission and `completions` completion queue entries.
    pub(crate) fn with_completions(entries: u32, completions: u32) -> io::Result<Self> {
        let uring = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_cqsize(completions)
            .build(entries)
        {
            Ok(uring) => uring,
            // A kernel before 5.19 has no COOP_TASKRUN.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_cqsize(completions)
                .build(entries)?,
            Err(e) => return Err(e),
        };
        Ok(Self {
            uring,
            ops: Slab::with_capacity(64),
            unsubmitted: false,
            driver: None,
        })
    }

    /// Makes this ring the current thread's and spawns its driver task on the current
    /// `LocalSet`. Must run inside the runtime (the ring's descriptor is registered
    /// with its reactor).
    pub(crate) fn start(self) -> io::Result<()> {
        // SAFETY: the descriptor is `self.uring`'s, open for this whole function; the
        // borrow only lives to be duplicated.
        let ring_fd = unsafe { BorrowedFd::borrow_raw(self.uring.as_raw_fd()) };
        // A descriptor of the driver task's own for the same ring: it stays open for as
        // long as the task polls it, whatever happens to the ring.
        let own = ring_fd.try_clone_to_owned()?;
        // SAFETY: `own` is a valid descriptor that the `AsyncFd` owns from here on and
        // closes (after deregistering it) only when dropped.
        let fd = unsafe { AsyncFd::register_with_interest(own, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        RING.with(|ring| *ring.borrow_mut() = Some(self));
        tokio::task::spawn_local(drive(fd));
        Ok(())
    }

    /// Hands every queued operation to the kernel.
    fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        loop {
            match self.uring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full: take completions, then try again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => {
                    // Nothing queued is lost: the entries stay in the queue for the
                    // next submission.
                    tracing::error!(error = %e, "io_uring submission failed");
                    return;
                }
            }
        }
        self.unsubmitted = false;
    }

    /// Takes every completion the kernel posted and wakes the tasks waiting for them,
    /// those it kept aside when the completion queue was full included.
    fn reap(&mut self) {
        for _ in 0..MAX_OVERFLOW_FLUSHES {
            self.reap_queue();
            // The completion queue overflowed: the kernel holds the rest and hands them
            // over only on an io_uring_enter with GETEVENTS, which the crate's submit
            // adds when it sees the overflow flag (it submits what is queued too). With
            // nothing queued no other enter would come, and the operations whose
            // completions were kept aside would wait for good.
            if !self.uring.submission().cq_overflow() {
                return;
            }
            match self.uring.submit() {
                Ok(_) => self.unsubmitted = false,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "io_uring enter to flush completions failed");
                    return;
                }
            }
        }
    }

    /// Takes what the completion queue holds now.
    fn reap_queue(&mut self) {
        let mut completions = self.uring.completion();
        completions.sync();
        for cqe in &mut completions {
            if cqe.user_data() == CANCEL {
                continue;
            }
            let Ok(index) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = self.ops.get_mut(index) else {
                continue;
            };
            match std::mem::replace(slot, Slot::Completed(cqe.result())) {
                Slot::Waiting(waker) => waker.wake(),
                Slot::Ignored(_) => {
                    // What it kept alive goes now.
                    self.ops.remove(index);
                }
                Slot::Submitted | Slot::Completed(_) => {}
            }
        }
    }

    /// Queues `entry` for an operation whose slot is `index`, submitting first when
    /// the queue is full.
    ///
    /// # Safety
    ///
    /// Every buffer or structure `entry` points to must stay valid (and not be moved)
    /// until the operation's completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller guarantees what `entry` points to outlives the operation.
        while unsafe { self.uring.submission().push(entry) }.is_err() {
            self.unsubmitted = true;
            self.submit();
            if self.uring.submission().is_full() {
                return Err(io::Error::other(
                    "io_uring submission queue full and not draining",
                ));
            }
        }
        if !self.unsubmitted {
            self.unsubmitted = true;
            if let Some(driver) = self.driver.take() {
                driver.wake();
            }
        }
        Ok(())
    }
}

/// Runs `f` on this thread's ring. Panics off a worker thread (a bug: only the
/// runtime's own tasks create operations).
fn with<R>(f: impl FnOnce(&mut Ring) -> R) -> R {
    RING.with(|ring| {
        let mut ring = ring.borrow_mut();
        let ring = ring
            .as_mut()
            .expect("io_uring operation outside a worker thread");
        f(ring)
    })
}

/// Submits what is queued and takes what completed, now. For a task that runs for long
/// without yielding to the core (the flusher between batches): the operations its
/// neighbours queued reach the kernel, and the tasks whose operations completed are
/// scheduled, without waiting for the driver task's turn.
pub(crate) fn tick() {
    RING.with(|ring| {
        if let Some(ring) = ring.borrow_mut().as_mut() {
            ring.submit();
            ring.reap();
        }
    });
}

/// The driver task: submits when woken by a new operation, reaps when the ring's
/// descriptor polls readable. Runs until the worker's `LocalSet` is dropped.
async fn drive(fd: AsyncFd<OwnedFd>) {
    poll_fn(|cx: &mut Context<'_>| {
        with(|ring| {
            ring.submit();
            ring.driver = Some(cx.waker().clone());
        });
        loop {
            // Clear first, then reap: a completion posted after the reap sets the
            // readiness again, so none is left waiting for the next one.
            match fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut ready)) => {
                    ready.clear_ready();
                    with(Ring::reap);
                }
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "polling the io_uring descriptor failed");
                    return Poll::Ready(());
                }
                Poll::Pending => {
                    // Completions reaped above may have queued nothing; new ones come
                    // through the readiness registered here.
                    with(Ring::reap);
                    return Poll::Pending;
                }
            }
        }
    })
    .await;
}

/// Ends this thread's ring, after the tasks that used it were dropped: cancels every
/// operation still in flight and waits (up to [`TEARDOWN_WAIT`]) for the kernel to be
/// done with their buffers. What is still in flight after that is leaked rather than
/// freed under the kernel.
pub(crate) fn teardown() {
    let Some(mut ring) = RING.with(|ring| ring.borrow_mut().take()) else {
        return;
    };
    ring.driver = None;
    let in_flight: Vec<usize> = ring
        .ops
        .iter()
        .filter(|(_, slot)| !matches!(slot, Slot::Completed(_)))
        .map(|(index, _)| index)
        .collect();
    for index in in_flight {
        let cancel = opcode::AsyncCancel::new(index as u64)
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancellation points to no memory.
        if unsafe { ring.push(&cancel) }.is_err() {
            break;
        }
    }
    let deadline = Instant::now() + TEARDOWN_WAIT;
    loop {
        ring.ops
            .retain(|_, slot| !matches!(slot, Slot::Completed(_)));
        if ring.ops.is_empty() || Instant::now() >= deadline {
            break;
        }
        ring.unsubmitted = false;
        let wait = io_uring::types::Timespec::new().nsec(10_000_000);
        let args = io_uring::types::SubmitArgs::new().timespec(&wait);
        let _ = ring.uring.submitter().submit_with_args(1, &args);
        ring.reap();
    }
    if !ring.ops.is_empty() {
        tracing::warn!(
            left = ring.ops.len(),
            "io_uring operations still in flight at the worker's end; their buffers are leaked"
        );
        std::mem::forget(ring);
    }
}

/// An io_uring operation in flight, and what it needs to stay alive until it completes
/// (`T`: its buffers and its socket). Awaiting it gives the completion's result (a
/// count, or `-errno`) and `T` back.
pub(crate) struct Op<T: 'static> {
    index: usize,
    data: Option<T>,
}

impl<T: 'static> Op<T> {
    /// Queues the operation `build` describes, with `data` kept alive until it
    /// completes.
    ///
    /// # Safety
    ///
    /// Everything the entry `build` returns points to must be inside `data`'s heap
    /// allocations (which moving `data` does not move) or otherwise live until the
    /// completion, and must not be touched by anyone else meanwhile.
    pub(crate) unsafe fn submit(
        mut data: T,
        build: impl FnOnce(&mut T) -> squeue::Entry,
    ) -> io::Result<Self> {
        let entry = build(&mut data);
        with(|ring| {
            let index = ring.ops.insert(Slot::Submitted);
            let entry = entry.user_data(index as u64);
            // SAFETY: what the entry points to lives in `data` (the caller's contract),
            // which this `Op` holds until the completion, or hands to the slot
            // (`Slot::Ignored`) when dropped first; `teardown` waits for (or leaks)
            // what is still in flight when the ring ends.
            match unsafe { ring.push(&entry) } {
                Ok(()) => Ok(Self {
                    index,
                    data: Some(data),
                }),
                Err(e) => {
                    ring.ops.remove(index);
                    Err(e)
                }
            }
        })
    }
}

impl<T: 'static + Unpin> Future for Op<T> {
    type Output = (i32, T);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let result = with(|ring| {
            let slot = ring.ops.get_mut(this.index)?;
            match slot {
                Slot::Completed(result) => {
                    let result = *result;
                    ring.ops.remove(this.index);
                    Some(result)
                }
                Slot::Waiting(waker) if waker.will_wake(cx.waker()) => None,
                _ => {
                    *slot = Slot::Waiting(cx.waker().clone());
                    None
                }
            }
        });
        match (result, this.data.take()) {
            (Some(result), Some(data)) => Poll::Ready((result, data)),
            (None, data) => {
                this.data = data;
                Poll::Pending
            }
            (Some(_), None) => unreachable!("an operation completes once"),
        }
    }
}

impl<T: 'static> Drop for Op<T> {
    fn drop(&mut self) {
        let Some(data) = self.data.take() else {
            return;
        };
        let mut data = Some(data);
        let _ = RING.try_with(|ring| {
            let Ok(mut ring) = ring.try_borrow_mut() else {
                return;
            };
            let Some(ring) = ring.as_mut() else { return };
            match ring.ops.get_mut(self.index) {
                Some(Slot::Completed(_)) => {
                    // The kernel is done with it: it may go.
                    ring.ops.remove(self.index);
                    data = None;
                }
                Some(slot) => {
                    if let Some(data) = data.take() {
                        *slot = Slot::Ignored(Box::new(data));
                    }
                }
                None => {}
            }
        });
        if let Some(data) = data {
            // No ring to hand it to (dropped inside a borrow of the ring, or after
            // the ring ended): keep it for good rather than free it under the kernel.
            std::mem::forget(data);
        }
    }
}

/// A `-errno` result as an error, a count as itself.
pub(crate) fn result(res: i32) -> io::Result<usize> {
    usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
}

/// Runs `future` on a worker-like thread of its own making (a current-thread runtime,
/// a `LocalSet` and a ring), for the runtime's unit tests.
#[cfg(test)]
pub(crate) fn run_local<F: Future>(future: F) -> F::Output {
    run_local_on(Ring::new(64).expect("an io_uring"), future)
}

/// [`run_local`] on `ring`.
#[cfg(test)]
pub(crate) fn run_local_on<F: Future>(ring: Ring, future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    let output = local.block_on(&runtime, async {
        ring.start().expect("the ring's driver");
        future.await
    });
    let _context = runtime.enter();
    drop(local);
    teardown();
    output
}

#[cfg(test)]
mod tests;
