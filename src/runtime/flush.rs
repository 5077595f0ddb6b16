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
//! submits the io_uring operations queued meanwhile (see `ring`). A read that
//! completes during a batch is handled right after it.
//!
//! What it leaves to the connection's driver (woken for it): a socket that did not
//! take everything (the rest goes out through an io_uring write that waits for room,
//! and the slow-consumer limit applies), a session whose driver has a write in flight
//! (bytes must not overtake it), and errors (the driver's write fails and ends the
//! connection).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use socket2::SockRef;

use super::feed::{Feed, FeedInner, give_owed};
use super::session::{NO_SOCKET, SessionInner, State, wake};
use crate::metrics::WorkerMetrics;
use crate::proto::CloseState;

/// Sessions written between two yields to the core: about 0.3–0.8 ms of writes to
/// loopback sockets. A message that reaches the core during a pass waits for the
/// batch under way before it is read (256 made a publisher's message wait 3.9 ms at
/// the median at 1,000 subscribers; 64 with the double yield below, 0.4 ms).
pub(crate) const FLUSH_BATCH: usize = 64;

/// Slices per `sendmsg`: Linux's `IOV_MAX`. A session with more queued chunks gets a
/// second write at once. Not fewer: under load a subscriber's batch grows with the
/// time a pass takes, and a smaller cap would turn one write per pass into several,
/// each costing the kernel's whole per-write price (64 held a 1,000-subscriber room at
/// 4 M deliveries/s, where whole batches reach more than twice that).
const MAX_SLICES: usize = 1024;

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

/// What the flusher writes: one session's queue, or a feed's followers (see `feed`).
enum Entry {
    Session(Rc<SessionInner>),
    Feed(Rc<Feed>),
}

/// Puts `session` at the back of this core's flush queue (its `queued_for_flush` flag
/// is set by the caller, so it is there at most once).
pub(crate) fn enqueue(session: Rc<SessionInner>) {
    push(Entry::Session(session));
}

/// Puts `feed` at the back of this core's flush queue (its `queued` flag is set by the
/// caller, so it is there at most once).
pub(crate) fn enqueue_feed(feed: Rc<Feed>) {
    push(Entry::Feed(feed));
}

fn push(entry: Entry) {
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
            match entry {
                Entry::Session(session) => {
                    write_queued(&session, &metrics);
                    budget -= 1;
                }
                Entry::Feed(feed) => {
                    let (visited, requeue) = feed.write_batch(budget, &metrics);
                    budget = budget.saturating_sub(visited.max(1));
                    if requeue {
                        enqueue_feed(feed);
                    }
                }
            }
        }
        // The core does not park while the flusher has work, so what other tasks
        // queued (e.g. the publisher's next read) is handed to the kernel here.
        super::ring::submit_pending();
        // Twice: the first yield lets the runtime take the io_uring completions, which
        // wakes their tasks (a publisher's read) behind this one; the second lets them
        // run before the next batch, instead of after it.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
}

/// Slices of the small array most writes use.
const FEW_SLICES: usize = 16;

/// What one `sendmsg` was asked to write.
struct Sent {
    /// Bytes from the connection's queue.
    queued: usize,
    /// Bytes of the feed frames the session is owed (0: none were in this write).
    owed: usize,
}

/// One non-blocking `sendmsg` of up to `N` - 1 queued chunks, followed by the feed
/// frames the session is owed when every queued chunk fits; returns its result and
/// what it was asked to write.
fn send_queued<const N: usize>(
    state: &State,
    feed: Option<&FeedInner>,
    socket: &BorrowedFd<'_>,
) -> (io::Result<usize>, Sent) {
    let mut slices = [IoSlice::new(&[]); N];
    let mut n = state.conn.transmit_slices(&mut slices[..N - 1]);
    let queued = slices[..n].iter().map(|s| s.len()).sum();
    if let (Some(feed), Some(follow)) = (feed, state.follow.as_ref()) {
        let owed = feed.owed_slice(follow);
        if n == state.conn.transmit_chunks() && !owed.is_empty() {
            slices[n] = IoSlice::new(owed);
            n += 1;
        }
    }
    let owed = slices[..n].iter().map(|s| s.len()).sum::<usize>() - queued;
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    let socket = SockRef::from(socket);
    // One slice (the usual broadcast write): `send`, which spares the kernel copying
    // and checking a message header and an iovec array.
    let written = match &slices[..n] {
        [one] => socket.send_with_flags(one, flags),
        many => socket.send_vectored_with_flags(many, flags),
    };
    (written, Sent { queued, owed })
}

/// Writes what `session` has queued with non-blocking `sendmsg`s, or hands it to its
/// driver. Also the driver's first write (the 101 and what the handler queued behind
/// it), made when the driver starts.
pub(crate) fn write_queued(session: &SessionInner, metrics: &WorkerMetrics) {
    let mut state = session.state.borrow_mut();
    state.queued_for_flush = false;
    let feed = state.follow.as_ref().map(|follow| follow.feed.clone());
    // The feed is only borrowed mutably while it appends or trims.
    let inner = feed
        .as_ref()
        .and_then(|feed| feed.inner().try_borrow().ok());
    write_session(&mut state, inner.as_deref(), metrics);
}

/// Writes what a session has queued, then the frames `feed` (the feed it follows, if
/// any) owes it, with non-blocking `sendmsg`s; what the socket does not take is left
/// to its driver, and its feed position is the feed's end afterwards. Returns false if
/// the connection can no longer take data (it is closing or its driver has ended).
pub(crate) fn write_session(
    state: &mut State,
    feed: Option<&FeedInner>,
    metrics: &WorkerMetrics,
) -> bool {
    let open = state.conn.close_state() == CloseState::Open && state.ended.is_none();
    let Some(fd) = Some(state.fd).filter(|&fd| fd != NO_SOCKET && !state.writing) else {
        // No driver yet, or it has ended (the frames are dropped), or its write goes
        // first and takes what is queued when it completes.
        if let Some(feed) = feed {
            if give_owed(state, feed, 0) > 0 {
                // The driver applies the outbound limit to what was queued.
                wake(&mut state.driver_waker);
            }
        }
        return open;
    };
    // Feed frames go out only while the connection can take data; otherwise the last
    // `give_owed` below drops them.
    let writable = feed.filter(|_| open);
    let mut sent = false;
    loop {
        let owed = match (writable, state.follow.as_ref()) {
            (Some(feed), Some(follow)) => feed.owed_frames(follow),
            _ => 0,
        };
        if state.conn.pending_output() == 0 && owed == 0 {
            break;
        }
        // SAFETY: `fd` is the socket of the session's live driver: the driver sets
        // `state.fd` when it starts and clears it in its `Drop`, before the stream it
        // owns is closed, and this runs on the same thread with the state borrowed.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        // Most writes carry a few chunks: a small array then, not 16 KiB of slices.
        let (written, want) = if state.conn.transmit_chunks() < FEW_SLICES {
            send_queued::<FEW_SLICES>(state, writable, &socket)
        } else {
            send_queued::<MAX_SLICES>(state, writable, &socket)
        };
        match written {
            Ok(written) => {
                let from_queue = written.min(want.queued);
                state.conn.advance_transmit(from_queue);
                metrics.bytes_out(written);
                sent = true;
                if let Some(feed) = writable.filter(|_| want.owed > 0) {
                    // All of it was written, or the rest goes to the connection's
                    // queue (and is counted when that is written).
                    let skip = written - from_queue;
                    let frames = give_owed(state, feed, skip);
                    if skip >= want.owed {
                        metrics.messages_out(frames);
                    }
                }
                if written < want.queued + want.owed {
                    // The socket is full: the driver waits for room.
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Full (`WouldBlock`) or failed: the driver's io_uring write waits for room,
            // or fails and ends the connection.
            Err(_) => break,
        }
    }
    if let Some(feed) = feed {
        // Whatever was not written goes to the driver.
        give_owed(state, feed, 0);
    }
    if sent {
        let messages = std::mem::take(&mut state.sent_messages);
        if messages > 0 {
            metrics.messages_out(u64::from(messages));
        }
    }
    if state.conn.pending_output() > 0 {
        wake(&mut state.driver_waker);
    }
    open
}
