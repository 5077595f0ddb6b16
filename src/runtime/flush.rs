//! A core's flush queue: frames delivered to many connections at once (a broadcast)
//! are written by one task per core, not by each connection's driver.
//!
//! `Session::send_frame` only queues the frame and, the first time, puts the session
//! at the back of this queue. The core's flusher takes sessions from the front and
//! writes everything each has queued with one non-blocking `sendmsg` (`MSG_DONTWAIT`),
//! straight from the connection's queue. A broadcast to 10,000 subscribers then costs
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
//! submits the io_uring operations queued meanwhile (see `ring`).
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

use super::session::{SessionInner, wake};
use crate::metrics::WorkerMetrics;

/// Sessions written between two yields to the core.
const FLUSH_BATCH: usize = 256;

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
    sessions: VecDeque<Rc<SessionInner>>,
    /// The flusher, parked while the queue is empty.
    waker: Option<Waker>,
}

/// Puts `session` at the back of this core's flush queue (its `queued_for_flush` flag
/// is set by the caller, so it is there at most once).
pub(crate) fn enqueue(session: Rc<SessionInner>) {
    QUEUE.with(|queue| {
        let mut queue = queue.borrow_mut();
        queue.sessions.push_back(session);
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    });
}

/// The core's flusher: runs for the worker's life.
pub(crate) async fn run(metrics: Arc<WorkerMetrics>) {
    let mut batch = Vec::with_capacity(FLUSH_BATCH);
    loop {
        poll_fn(|cx| {
            QUEUE.with(|queue| {
                let mut queue = queue.borrow_mut();
                if queue.sessions.is_empty() {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let n = queue.sessions.len().min(FLUSH_BATCH);
                batch.extend(queue.sessions.drain(..n));
                Poll::Ready(())
            })
        })
        .await;
        for session in batch.drain(..) {
            write_queued(&session, &metrics);
        }
        // The core does not park while the flusher has work, so what other tasks
        // queued (e.g. the publisher's next read) is handed to the kernel here.
        super::ring::submit_pending();
        tokio::task::yield_now().await;
    }
}

/// Slices of the small array most writes use.
const FEW_SLICES: usize = 16;

/// One non-blocking `sendmsg` of up to `N` queued chunks; returns its result and how
/// many bytes it was asked to write.
fn send_queued<const N: usize>(
    conn: &crate::proto::Connection,
    socket: &BorrowedFd<'_>,
) -> (io::Result<usize>, usize) {
    let mut slices = [IoSlice::new(&[]); N];
    let n = conn.transmit_slices(&mut slices);
    let want = slices[..n].iter().map(|s| s.len()).sum();
    let written = SockRef::from(socket)
        .send_vectored_with_flags(&slices[..n], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    (written, want)
}

/// Writes what `session` has queued with non-blocking `sendmsg`s, or hands it to its
/// driver. Also the driver's first write (the 101 and what the handler queued behind
/// it), made when the driver starts.
pub(crate) fn write_queued(session: &SessionInner, metrics: &WorkerMetrics) {
    let mut guard = session.state.borrow_mut();
    let state = &mut *guard;
    state.queued_for_flush = false;
    let Some(fd) = state.fd else {
        // The driver has ended: nothing may be written to its socket any more.
        return;
    };
    if state.writing {
        // The driver's write goes first; it takes what is queued when it completes.
        return;
    }
    let mut sent = false;
    while state.conn.pending_output() > 0 {
        // SAFETY: `fd` is the socket of the session's live driver: the driver sets
        // `state.fd` when it starts and clears it in its `Drop`, before the stream it
        // owns is closed, and this runs on the same thread with the state borrowed.
        let socket = unsafe { BorrowedFd::borrow_raw(fd) };
        // Most writes carry a few frames: a small array then, not 16 KiB of slices.
        let (written, want) = if state.conn.transmit_chunks() <= FEW_SLICES {
            send_queued::<FEW_SLICES>(&state.conn, &socket)
        } else {
            send_queued::<MAX_SLICES>(&state.conn, &socket)
        };
        match written {
            Ok(written) => {
                state.conn.advance_transmit(written);
                metrics.bytes_out(written);
                sent = true;
                if written < want {
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
    if sent {
        let messages = std::mem::take(&mut state.sent_messages);
        if messages > 0 {
            metrics.messages_out(messages);
        }
    }
    if state.conn.pending_output() > 0 {
        wake(&mut state.driver_waker);
    }
}
