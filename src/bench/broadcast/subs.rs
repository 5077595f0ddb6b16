//! A load generator thread's subscribers, read by one task through one epoll set.
//!
//! A task per subscriber costs a readiness event, a task wake-up and a poll for every
//! read; with 10,000 subscribers on one core that was as much as the server spent per
//! write, so the load generator, not the server, set the latency it measured (its
//! queue of ready sockets only grew). Here the subscribers' sockets are in an epoll
//! set of their own (edge-triggered), and one task takes up to [`EVENTS`] ready sockets
//! per `epoll_wait` and reads each once: a read that does not fill the buffer leaves
//! the socket drained, and the next data raises a new edge.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::Phase;
use super::Shared;
use super::conns::{ThreadState, receive};
use crate::bench::client::{BenchStream, Client};
use crate::proto::Connection;

/// Ready sockets taken per `epoll_wait`; the task yields to the thread's timers after
/// each batch, and within one as soon as a publisher has messages due.
const EVENTS: usize = 1024;

/// Reads between two checks of whether a publisher of the thread has messages due.
const DUE_CHECK: usize = 32;

struct Sub {
    index: usize,
    stream: std::net::TcpStream,
    conn: Connection,
    /// False once the connection failed (it is out of the set).
    alive: bool,
}

/// Reads every subscriber until the phase says stop, then closes them all.
pub(super) async fn run(
    clients: Vec<(usize, Client)>,
    state: Rc<RefCell<ThreadState>>,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) {
    let (epoll, mut subs) = match register(clients) {
        Ok(set) => set,
        Err(e) => {
            state
                .borrow_mut()
                .fail(format!("cannot set up the subscribers' epoll set: {e}"));
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `epoll_event` is plain data; all-zero is a valid value.
    let mut events = vec![unsafe { std::mem::zeroed::<libc::epoll_event>() }; EVENTS];
    let mut current = phase.borrow_and_update().clone();
    while !matches!(current, Phase::Stop) {
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    break;
                }
                current = phase.borrow_and_update().clone();
            }
            ready = epoll.readable() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(e) => {
                        state.borrow_mut().fail(format!("epoll failed: {e}"));
                        break;
                    }
                };
                let ready = wait(epoll.get_ref().as_raw_fd(), &mut events);
                if ready == 0 {
                    guard.clear_ready();
                    continue;
                }
                if phase.has_changed().unwrap_or(false) {
                    current = phase.borrow_and_update().clone();
                }
                for (i, event) in events[..ready].iter().enumerate() {
                    if i % DUE_CHECK == DUE_CHECK - 1
                        && state.borrow().publisher_due(Instant::now())
                    {
                        // A publisher's messages are due: its timer fires when this
                        // task yields, not after the rest of the batch.
                        tokio::task::yield_now().await;
                    }
                    let index = event.u64 as usize;
                    if let Some(sub) = subs.get_mut(index) {
                        on_ready(sub, &mut buf, &state, &shared, &current, &epoll);
                    }
                }
                if ready < EVENTS {
                    // The set had no more ready sockets: a socket that becomes ready
                    // from now on signals the set again, so the next wait needs no
                    // `epoll_wait` that finds nothing.
                    guard.clear_ready();
                } else {
                    drop(guard);
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    close_all(subs, &state).await;
}

/// Moves the subscribers' sockets out of the runtime into a new epoll set.
fn register(clients: Vec<(usize, Client)>) -> io::Result<(AsyncFd<OwnedFd>, Vec<Sub>)> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut subs = Vec::with_capacity(clients.len());
    for (slot, (index, client)) in clients.into_iter().enumerate() {
        // `broadcast` refuses TLS before opening anything, so a subscriber is plain TCP.
        let stream = client.stream.into_plain()?.into_std()?;
        stream.set_nonblocking(true)?;
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: slot as u64,
        };
        // SAFETY: both descriptors are open; `event` is a valid epoll_event.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                &mut event,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        subs.push(Sub {
            index,
            stream,
            conn: client.conn,
            alive: true,
        });
    }
    // SAFETY: `OwnedFd` always returns the descriptor it owns, which stays open until
    // the `AsyncFd` (its owner from here) is dropped.
    let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
        .map_err(io::Error::from)?;
    Ok((epoll, subs))
}

/// Takes the ready events without blocking; returns how many.
fn wait(epoll: RawFd, events: &mut [libc::epoll_event]) -> usize {
    let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
    // SAFETY: `events` has room for `max` entries.
    let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), max, 0) };
    usize::try_from(n).unwrap_or(0)
}

/// Reads a ready subscriber once (see the module docs), accounts for its messages and
/// answers what the protocol needs (pongs) with a non-blocking write.
fn on_ready(
    sub: &mut Sub,
    buf: &mut [u8],
    state: &RefCell<ThreadState>,
    shared: &Shared,
    phase: &Phase,
    epoll: &AsyncFd<OwnedFd>,
) {
    if !sub.alive {
        return;
    }
    let failure = loop {
        match sub.stream.read(buf) {
            Ok(0) => break Some("closed by the server without a close frame (1006)".into()),
            Ok(n) => {
                sub.conn.handle_bytes(&buf[..n]);
                if n < buf.len() {
                    break None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Some(format!("read failed: {e}")),
        }
    };
    let failure = failure
        .or_else(|| receive(&mut sub.conn, sub.index, state, shared, phase).err())
        .or_else(|| flush(sub).err().map(|e| format!("write failed: {e}")));
    if let Some(cause) = failure {
        state.borrow_mut().fail(cause);
        sub.alive = false;
        // SAFETY: both descriptors are open; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                sub.stream.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
    }
}

/// Writes what the connection has queued (pongs), without blocking: what the socket
/// does not take waits for the next read.
fn flush(sub: &mut Sub) -> io::Result<()> {
    while let Some(chunk) = sub.conn.poll_transmit() {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            match sub.stream.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Rare (a control frame to a full socket): sent with the next one.
                    sub.conn.send_raw_first(bytes::Bytes::copy_from_slice(rest));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Hands the live subscribers back to the runtime and closes them all at once.
async fn close_all(subs: Vec<Sub>, state: &Rc<RefCell<ThreadState>>) {
    let mut closing = Vec::with_capacity(subs.len());
    for sub in subs.into_iter().filter(|sub| sub.alive) {
        match tokio::net::TcpStream::from_std(sub.stream) {
            Ok(stream) => {
                let mut client = Client {
                    stream: BenchStream::Plain(stream),
                    conn: sub.conn,
                };
                closing.push(tokio::task::spawn_local(async move {
                    client.close(Duration::from_secs(2)).await
                }));
            }
            Err(_) => state.borrow_mut().close_failures += 1,
        }
    }
    for task in closing {
        if !task.await.unwrap_or(false) {
            state.borrow_mut().close_failures += 1;
        }
    }
}
