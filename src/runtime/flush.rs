//! A core's flush queue: frames delivered to many connections at once (a broadcast)
//! are written by one task per core, not by each connection's driver.
//!
//! The queue holds sessions and feeds (see `feed`). `Session::send_frame` only queues
//! the frame and, the first time, puts the session at the back of this queue; a
//! feed's push puts the feed there, and its turn is a pass over its followers, each
//! written like a session, with the feed frames it is owed behind its own queue. The
//! core's flusher takes entries from the front and writes everything each has queued
//! with one non-blocking `send` or `sendmsg` (`MSG_DONTWAIT`), straight from the
//! connection's queue. A broadcast to 10,000 subscribers then costs
//! 10,000 system calls in a loop and no task wake-up, io_uring operation or future per
//! subscriber; the kernel's TCP send is what remains.
//!
//! Order and batching: every frame that reaches a session before the flusher gets to
//! it goes out in the same write, and a session that gets more after its write goes to
//! the back of the queue again. A message that arrives while a broadcast is being
//! written starts to go out to the subscribers already written at once, as a wave
//! behind the first: no subscriber waits for more than one pass over the queue.
//!
//! The flusher yields to the core after every [`FLUSH_BATCH`] sessions, so reads
//! (the publisher's next messages), timers and other connections keep running, and
//! first submits the io_uring operations queued meanwhile and takes the completions
//! (`uring::tick`). A read that completes during a batch is handled right after it.
//!
//! What it leaves to the connection's driver (woken for it): a socket that did not
//! take everything (the rest goes out through an io_uring write that waits for room,
//! and the slow-consumer limit applies), a session whose driver has a write in flight
//! (bytes must not overtake it), and errors (the driver's write fails and ends the
//! connection).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use crate::metrics::WorkerMetrics;

/// Sessions written between two yields to the core: about 0.3–0.8 ms of writes to
/// loopback sockets. A message that reaches the core during a pass waits for the
/// batch under way before it is read (256 made a publisher's message wait 3.9 ms at
/// the median at 1,000 subscribers; 64 with the double yield below, 0.4 ms).
pub(crate) const FLUSH_BATCH: usize = 64;

thread_local! {
    static QUEUE: RefCell<FlushQueue> = const {
        RefCell::new(FlushQueue { sessions: VecDeque::new(), waker: None })
    };
}

struct FlushQueue {
    sessions: VecDeque<Entry>,
    /// The flusher, parked while the queue is empty.
    waker: Option<Waker>,
}

/// Something the flusher writes at its turn: one session's queue, or a feed's
/// followers (see `feed`). The queue knows nothing else of them.
pub(crate) trait Flush {
    /// Writes, visiting at most `budget` sessions. Returns how many it visited (at
    /// least 1 is counted) and whether it must stay in the queue (more to write).
    fn flush(&self, budget: usize, metrics: &WorkerMetrics) -> (usize, bool);
}

type Entry = Rc<dyn Flush>;

/// Puts `entry` at the back of this core's flush queue. The caller marks it as queued
/// (a session's outbox, a feed's flag), so that it is there at most once.
pub(crate) fn enqueue(entry: Rc<dyn Flush>) {
    QUEUE.with(|queue| {
        let mut queue = queue.borrow_mut();
        queue.sessions.push_back(entry);
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    });
}

fn pop() -> Option<Entry> {
    QUEUE.with(|queue| queue.borrow_mut().sessions.pop_front())
}

/// The core's flusher: runs for the worker's life.
pub(crate) async fn run(metrics: Arc<WorkerMetrics>) {
    loop {
        poll_fn(|cx| {
            QUEUE.with(|queue| {
                let mut queue = queue.borrow_mut();
                if queue.sessions.is_empty() {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(())
            })
        })
        .await;
        // Entries queued during this batch wait for the next one.
        let mut entries = QUEUE.with(|queue| queue.borrow().sessions.len());
        let mut budget = FLUSH_BATCH;
        while budget > 0 && entries > 0 {
            let Some(entry) = pop() else { break };
            entries -= 1;
            let (visited, requeue) = entry.flush(budget, &metrics);
            budget = budget.saturating_sub(visited.max(1));
            if requeue {
                enqueue(entry);
            }
        }
        // What other tasks queued on the ring (e.g. the publisher's next read) goes to
        // the kernel, and the tasks whose operations completed during the batch are
        // scheduled; the yield lets them run before the next batch.
        super::uring::tick();
        tokio::task::yield_now().await;
    }
}
