//! The outbox: a connection's write side, the one place that decides what is written
//! to its socket, in which order and by whom.
//!
//! What a connection is owed lies in two places: its `proto::Connection`'s transmit
//! queue (the 101, the handler's messages, control frames, shared broadcast frames)
//! and, for a follower of a feed (a topic's broadcasts on this core), the feed frames
//! past its position. The outbox writes the queue first, then the feed frames, in one
//! non-blocking write through the [`Transport`]; what the socket does not take is moved
//! into the queue, for the driver's write that waits for room.
//!
//! Who writes, by [`WritePhase`]:
//!
//! ```text
//!   Detached ──attach──▶ Idle ──begin_wait──▶ Waiting
//!      ▲                  ▲  ◀──end_wait──────┘
//!      └──────detach──────┴──────────────────────────  (from any phase)
//! ```
//!
//! - `Detached`: no driver (the handshake is not over, or the driver has ended):
//!   nothing is written; feed frames owed go to the queue (or are dropped once the
//!   session has ended).
//! - `Idle`: [`Outbox::write_now`] writes at once (the core's flusher, the driver's
//!   first write).
//! - `Waiting`: the driver's write of what the socket did not take is in flight;
//!   nothing else may write, or bytes would overtake it.
//!
//! Independently, a session is in the core's flush queue at most once
//! ([`Outbox::schedule`] says when to put it there).
//!
//! Call order for a write turn: [`Outbox::take_flush_turn`] (if it came from the flush
//! queue), then [`Outbox::write_now`]; the caller wakes the driver when
//! [`WriteNow::wake_driver`] says so. Before anything else is queued to the connection
//! (a handler's send, a Close), [`Outbox::catch_up`] moves what the feed owes into the
//! queue, so that everything leaves in the order it was queued.

use std::cell::Ref;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;

use bytes::Bytes;

use super::transport::Transport;
use crate::metrics::WorkerMetrics;
use crate::proto::frame::frame_rest;
use crate::proto::{CloseState, Connection};

/// Slices per write: Linux's `IOV_MAX`. A session with more queued chunks gets a
/// second write at once. Not fewer: under load a subscriber's batch grows with the
/// time a pass takes, and a smaller cap would turn one write per pass into several,
/// each costing the kernel's whole per-write price (64 held a 1,000-subscriber room at
/// 4 M deliveries/s, where whole batches reach more than twice that).
const MAX_SLICES: usize = crate::runtime::buf::IOV_MAX;

/// Slices of the small array most writes use.
const FEW_SLICES: usize = 16;

/// Who may write to the connection's socket now (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WritePhase {
    /// No driver: nothing is written.
    Detached,
    /// A driver runs and no write is in flight: write at once.
    Idle,
    /// The driver's write that waits for room is in flight.
    Waiting,
}

/// The frames of a feed, as a follower's outbox reads them.
pub(crate) trait FeedView {
    /// The number of the next frame to be appended.
    fn end(&self) -> u64;
    /// The bytes of frames `next..`, back to back, and how many frames that is.
    fn owed(&self, next: u64) -> (&[u8], u64);
}

/// A handle to the feed a session follows.
pub(crate) trait FeedHandle {
    /// What the handle shows of the feed.
    type View: FeedView;
    /// The feed's frames, unless the feed is being changed right now (it is borrowed
    /// mutably only while it appends or trims, never while it calls out to sessions).
    fn view(&self) -> Option<Ref<'_, Self::View>>;
}

/// A session's place in the feed it follows.
pub(crate) struct Follow<F> {
    pub(crate) feed: F,
    /// Its index in the feed's followers (the feed's bookkeeping).
    pub(crate) index: usize,
    /// The number of the next frame it has not been given.
    pub(crate) next: u64,
}

/// What [`Outbox::schedule`] asks of the caller after a frame was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Schedule {
    /// Nothing: a write that will take it is coming (the driver is polling, or the
    /// session is in the flush queue already).
    Nothing,
    /// Wake the driver: its write in flight, or its start, takes it.
    WakeDriver,
    /// Put the session in the core's flush queue (it is marked as there).
    Flush,
}

/// What a [`Outbox::write_now`] turn did and leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteNow {
    /// The connection can still take data (not closing, not ended).
    pub(crate) open: bool,
    /// Output is left in the queue for the driver: wake it.
    pub(crate) wake_driver: bool,
    /// Something was written: the messages counted as queued are now sent.
    pub(crate) wrote: bool,
    /// Feed frames moved into the queue, as messages to count.
    pub(crate) queued: u64,
}

/// A connection's write side (see the module docs).
///
/// The message count that goes with it (messages queued, counted as sent when
/// written) is the caller's: [`WriteNow::queued`] and the counts returned say how many
/// messages the outbox queued. (Kept outside, the outbox takes 24 bytes and a session
/// stays in its size class.)
pub(crate) struct Outbox<F, T> {
    phase: WritePhase,
    in_flush_queue: bool,
    /// `socket`'s [`Transport::key`] while it is attached (-1 otherwise): set and
    /// cleared together with `socket`, by `attach` and `detach` only.
    key: RawFd,
    /// The socket, while a driver runs.
    socket: Option<T>,
    /// The feed this session follows, if any. Boxed: most sessions follow none.
    follow: Option<Box<Follow<F>>>,
}

impl<F: FeedHandle, T: Transport> Outbox<F, T> {
    /// The outbox of a connection whose driver has not started.
    pub(crate) fn new() -> Self {
        Self {
            phase: WritePhase::Detached,
            in_flush_queue: false,
            key: -1,
            socket: None,
            follow: None,
        }
    }

    /// Who may write now.
    #[cfg(test)]
    pub(crate) fn phase(&self) -> WritePhase {
        self.phase
    }

    /// The driver started: writes go to `socket` from now on.
    pub(crate) fn attach(&mut self, socket: T) {
        self.key = socket.key();
        self.socket = Some(socket);
        self.phase = WritePhase::Idle;
    }

    /// The driver ended: nothing is written any more, and the socket is let go of (so
    /// it closes with the driver's last reference).
    pub(crate) fn detach(&mut self) {
        self.socket = None;
        self.key = -1;
        self.phase = WritePhase::Detached;
    }

    /// What to do after a frame was queued for many sessions at once (a broadcast):
    /// `driver_polling` says the driver is polling right now and writes when its poll
    /// ends.
    pub(crate) fn schedule(&mut self, driver_polling: bool) -> Schedule {
        if driver_polling {
            return Schedule::Nothing;
        }
        match self.phase {
            // The driver's write applies the outbound limit; a driver that has not
            // started takes this with the rest.
            WritePhase::Waiting | WritePhase::Detached => Schedule::WakeDriver,
            WritePhase::Idle if self.in_flush_queue => Schedule::Nothing,
            WritePhase::Idle => {
                self.in_flush_queue = true;
                Schedule::Flush
            }
        }
    }

    /// The session's turn in the flush queue has come: it is no longer there.
    pub(crate) fn take_flush_turn(&mut self) {
        self.in_flush_queue = false;
    }

    /// Starts the driver's write that waits for room: moves everything queued into
    /// `iov` and enters [`WritePhase::Waiting`]. False (and nothing moved) when a write
    /// is in flight already, no driver runs, or nothing is queued.
    pub(crate) fn begin_wait(
        &mut self,
        conn: &mut Connection,
        iov: &mut Vec<bytes::Bytes>,
    ) -> bool {
        if self.phase != WritePhase::Idle {
            return false;
        }
        conn.drain_transmit(iov);
        // TLS ciphertext the socket did not take goes out with this write, first.
        let backlog = self.socket.as_ref().map_or(0, Transport::backlog);
        if iov.is_empty() && backlog == 0 {
            return false;
        }
        self.phase = WritePhase::Waiting;
        true
    }

    /// The driver's write completed: others may write again.
    pub(crate) fn end_wait(&mut self) {
        if self.phase == WritePhase::Waiting {
            self.phase = WritePhase::Idle;
        }
    }

    // ---- the feed position ----------------------------------------------------------

    /// The feed this session follows, and its place there.
    pub(crate) fn follow(&self) -> Option<&Follow<F>> {
        self.follow.as_deref()
    }

    /// Mutable access to the place in the feed (the feed's bookkeeping).
    pub(crate) fn follow_mut(&mut self) -> Option<&mut Follow<F>> {
        self.follow.as_deref_mut()
    }

    /// Starts following a feed (the caller moved what an earlier one owed first).
    pub(crate) fn set_follow(&mut self, follow: Follow<F>) {
        self.follow = Some(Box::new(follow));
    }

    /// Stops following; returns the place it had.
    pub(crate) fn take_follow(&mut self) -> Option<Follow<F>> {
        self.follow.take().map(|follow| *follow)
    }

    /// Moves the frames the feed owes into the queue of `conn` (dropped when `ended`),
    /// from byte `skip` of them on; the position is then the feed's end. Returns how
    /// many frames the feed owed, and how many of them were queued (as messages to
    /// count).
    pub(crate) fn give_owed(
        &mut self,
        conn: &mut Connection,
        ended: bool,
        feed: &F::View,
        skip: usize,
    ) -> Given {
        match self.follow.as_mut() {
            Some(follow) => give(&mut follow.next, conn, ended, feed, skip),
            None => Given::default(),
        }
    }

    /// Moves what the feed owes into the queue, so that what is queued next goes
    /// after it. Nothing for a session that follows no feed. Returns the messages
    /// queued.
    pub(crate) fn catch_up(&mut self, conn: &mut Connection, ended: bool) -> u64 {
        let Some(follow) = self.follow.as_deref_mut() else {
            return 0;
        };
        let Follow { feed, next, .. } = follow;
        let Some(view) = feed.view() else {
            debug_assert!(false, "feed borrowed during catch-up");
            return 0;
        };
        give(next, conn, ended, &*view, 0).queued
    }

    /// Drops what the feed owes without giving it (a slow consumer's backlog).
    pub(crate) fn skip_owed(&mut self) {
        if let Some(follow) = self.follow.as_mut() {
            if let Some(view) = follow.feed.view() {
                let end = view.end();
                drop(view);
                follow.next = end;
            }
        }
    }

    // ---- writing --------------------------------------------------------------------

    /// Writes what `conn` has queued, then the frames `feed` (the view of the feed this
    /// session follows, if any) owes it, with non-blocking writes, while the phase is
    /// [`WritePhase::Idle`]; otherwise, and for what the socket does not take, the feed
    /// frames go to the queue for the driver. The feed position is the feed's end
    /// afterwards. `ended`: the session has ended (its frames are dropped).
    pub(crate) fn write_now(
        &mut self,
        conn: &mut Connection,
        ended: bool,
        feed: Option<&F::View>,
        metrics: &WorkerMetrics,
    ) -> WriteNow {
        let open = conn.close_state() == CloseState::Open && !ended;
        let mut done = WriteNow {
            open,
            wake_driver: false,
            wrote: false,
            queued: 0,
        };
        let Some(socket) = self
            .socket
            .as_ref()
            .filter(|_| self.phase == WritePhase::Idle)
        else {
            // No driver yet, or it has ended (the frames are dropped), or its write
            // goes first and takes what is queued when it completes.
            if let Some(feed) = feed {
                let given = self.give_owed(conn, ended, feed, 0);
                done.queued = given.queued;
                // The driver applies the outbound limit to what was queued.
                done.wake_driver = given.frames > 0;
            }
            return done;
        };
        let key = self.key;
        // Feed frames go out only while the connection can take data; otherwise the
        // last `give_owed` below drops them.
        let writable = feed.filter(|_| open);
        let next = self.follow.as_ref().map(|follow| follow.next);
        let mut fed = None;
        loop {
            // In bytes, not frames: frames a follower behind the feed's start is owed
            // are not there to write (`FeedView::owed` gives none), and a zero-length
            // write would loop.
            let owed = match (writable, next) {
                (Some(feed), Some(next)) => feed.owed(next).0.len(),
                _ => 0,
            };
            if conn.pending_output() == 0 && owed == 0 {
                break;
            }
            // Most writes carry a few chunks: a small array then, not 16 KiB of slices.
            let (written, want) = if conn.transmit_chunks() < FEW_SLICES {
                write_queued::<FEW_SLICES, _, _>(conn, writable, next, socket, key)
            } else {
                write_queued::<MAX_SLICES, _, _>(conn, writable, next, socket, key)
            };
            match written {
                Ok(written) => {
                    let from_queue = written.min(want.queued);
                    conn.advance_transmit(from_queue);
                    metrics.bytes_out(written);
                    done.wrote = true;
                    if want.owed > 0 {
                        // The feed frames were in this write: all of them went out,
                        // or the rest goes to the queue (`give_owed` below).
                        fed = Some((written - from_queue, want.owed));
                        break;
                    }
                    if written < want.queued {
                        // The socket is full: the driver waits for room.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Full (`WouldBlock`) or failed: the driver's write waits for room, or
                // fails and ends the connection.
                Err(_) => break,
            }
        }
        if let (Some(feed), Some((skip, owed))) = (writable, fed) {
            let given = self.give_owed(conn, ended, feed, skip);
            done.queued += given.queued;
            if skip >= owed {
                // All of them were written: count them now.
                metrics.messages_out(given.frames);
            }
        }
        if let Some(feed) = feed {
            // Whatever was not written goes to the driver.
            done.queued += self.give_owed(conn, ended, feed, 0).queued;
        }
        let backlog = self.socket.as_ref().map_or(0, Transport::backlog);
        done.wake_driver = conn.pending_output() > 0 || backlog > 0;
        done
    }
}

/// Moves the frames `feed` owes from frame `next` on into the queue of `conn`
/// (dropped when `ended`), from byte `skip` of them on, and sets `next` to the feed's
/// end: [`Outbox::give_owed`] and [`Outbox::catch_up`], which borrow the feed
/// differently.
fn give<V: FeedView>(
    next: &mut u64,
    conn: &mut Connection,
    ended: bool,
    feed: &V,
    skip: usize,
) -> Given {
    let (owed, frames) = feed.owed(*next);
    *next = feed.end();
    if frames == 0 || ended || skip >= owed.len() {
        return Given { frames, queued: 0 };
    }
    let rest = Bytes::copy_from_slice(&owed[skip..]);
    let queued = if skip == 0 {
        conn.send_frame(rest).is_ok()
    } else {
        // The socket took the first `skip` bytes: the rest of that frame goes first,
        // whatever is queued later (a Pong) goes after it.
        let frame_rest = frame_rest(owed, skip).unwrap_or(owed.len() - skip);
        conn.send_frame_rest(rest, frame_rest);
        true
    };
    Given {
        frames,
        queued: if queued { frames } else { 0 },
    }
}

/// How many frames a feed owed and how many of them were queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Given {
    pub(crate) frames: u64,
    pub(crate) queued: u64,
}

/// What one write was asked to take.
struct Want {
    /// Bytes from the connection's queue.
    queued: usize,
    /// Bytes of the feed frames the session is owed (0: none were in this write).
    owed: usize,
}

/// One non-blocking write of up to `N` - 1 queued chunks, followed by the feed frames
/// owed from frame `next` on when every queued chunk fits; returns its result and what
/// it was asked to write.
fn write_queued<const N: usize, V: FeedView, T: Transport>(
    conn: &Connection,
    feed: Option<&V>,
    next: Option<u64>,
    socket: &T,
    key: RawFd,
) -> (io::Result<usize>, Want) {
    let mut slices = [IoSlice::new(&[]); N];
    let mut n = conn.transmit_slices(&mut slices[..N - 1]);
    let queued = slices[..n].iter().map(|s| s.len()).sum();
    if let (Some(feed), Some(next)) = (feed, next) {
        let owed = feed.owed(next).0;
        if n == conn.transmit_chunks() && !owed.is_empty() {
            slices[n] = IoSlice::new(owed);
            n += 1;
        }
    }
    let owed = slices[..n].iter().map(|s| s.len()).sum::<usize>() - queued;
    // SAFETY: `key` is `socket`'s own key: the outbox sets and clears its `key` and
    // `socket` fields together (`attach`, `detach`), and hands both to this function.
    let written = unsafe { socket.try_write(key, &slices[..n]) };
    (written, Want { queued, owed })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::*;
    use crate::proto::conn::encode_server_frame;
    use crate::proto::{CloseCode, Limits, OpCode};
    use crate::runtime::core::transport::testing::Wire;

    /// A feed for the tests: frames back to back, numbered from 0.
    #[derive(Default)]
    struct Frames {
        data: Vec<u8>,
        starts: Vec<usize>,
        /// Frames dropped from the front (numbered before the first one held).
        base: u64,
    }

    impl Frames {
        fn push(&mut self, frame: &[u8]) {
            self.starts.push(self.data.len());
            self.data.extend_from_slice(frame);
        }
    }

    impl FeedView for Frames {
        fn end(&self) -> u64 {
            self.base + self.starts.len() as u64
        }

        fn owed(&self, next: u64) -> (&[u8], u64) {
            let Some(index) = next.checked_sub(self.base) else {
                return (&[], 0);
            };
            match self.starts.get(index as usize) {
                Some(&at) => (&self.data[at..], self.end() - next),
                None => (&[], 0),
            }
        }
    }

    impl FeedHandle for Rc<RefCell<Frames>> {
        type View = Frames;

        fn view(&self) -> Option<Ref<'_, Frames>> {
            self.try_borrow().ok()
        }
    }

    type TestOutbox = Outbox<Rc<RefCell<Frames>>, Rc<Wire>>;

    fn text(s: &str) -> Vec<u8> {
        encode_server_frame(OpCode::Text, s.as_bytes()).to_vec()
    }

    /// An outbox following a feed that holds `frames`, and a connection.
    fn setup(frames: &[&str]) -> (TestOutbox, Rc<RefCell<Frames>>, Connection) {
        let feed = Rc::new(RefCell::new(Frames::default()));
        for frame in frames {
            feed.borrow_mut().push(&text(frame));
        }
        let mut outbox = TestOutbox::new();
        outbox.set_follow(Follow {
            feed: feed.clone(),
            index: 0,
            next: 0,
        });
        (outbox, feed, Connection::server(Limits::default()))
    }

    fn wire(room: usize) -> Rc<Wire> {
        let wire = Rc::new(Wire::default());
        wire.room.set(room);
        wire
    }

    fn queued(conn: &mut Connection) -> Vec<u8> {
        let mut chunks = Vec::new();
        conn.drain_transmit(&mut chunks);
        chunks.concat()
    }

    /// Without a driver nothing is written: what the feed owes moves to the queue,
    /// for the driver, which is to be woken.
    #[test]
    fn a_detached_outbox_writes_nothing_and_queues_what_the_feed_owes() {
        let (mut outbox, feed, mut conn) = setup(&["a", "b"]);
        assert_eq!(outbox.phase(), WritePhase::Detached);
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert_eq!(
            done,
            WriteNow {
                open: true,
                wake_driver: true,
                wrote: false,
                queued: 2,
            }
        );
        assert_eq!(queued(&mut conn), [text("a"), text("b")].concat());
        assert_eq!(outbox.follow().map(|f| f.next), Some(2));
    }

    /// The connection's own queue goes first, then the feed frames, in one write.
    #[test]
    fn the_queue_then_the_feed_frames_go_out_in_one_write() {
        let (mut outbox, feed, mut conn) = setup(&["f1", "f2"]);
        let socket = wire(1 << 20);
        outbox.attach(socket.clone());
        conn.send_text("own").unwrap();
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert_eq!(
            done,
            WriteNow {
                open: true,
                wake_driver: false,
                wrote: true,
                queued: 0,
            }
        );
        assert_eq!(
            *socket.written.borrow(),
            [text("own"), text("f1"), text("f2")].concat()
        );
        assert_eq!(socket.writes.get(), 1);
        assert_eq!(conn.pending_output(), 0);
    }

    /// What a full socket does not take stays in order: the rest of the feed frames
    /// moves into the queue behind what is left of it, for the driver's write.
    #[test]
    fn a_full_socket_leaves_the_rest_to_the_driver_in_order() {
        let (mut outbox, feed, mut conn) = setup(&["f1", "f2"]);
        let own = text("own");
        let socket = wire(own.len() + 3);
        outbox.attach(socket.clone());
        conn.send_text("own").unwrap();
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert_eq!(
            done,
            WriteNow {
                open: true,
                wake_driver: true,
                wrote: true,
                queued: 2,
            }
        );
        let room = own.len() + 3;
        let all = [own, text("f1"), text("f2")].concat();
        let written = socket.written.borrow().clone();
        assert_eq!(written.len(), room, "the socket took what it had room for");
        assert_eq!([written, queued(&mut conn)].concat(), all);
        assert_eq!(outbox.follow().map(|f| f.next), Some(2));
    }

    /// While the driver's write waits for room, nothing overtakes it: new feed frames
    /// go to the queue behind what it is writing.
    #[test]
    fn nothing_overtakes_a_write_in_flight() {
        let (mut outbox, feed, mut conn) = setup(&[]);
        let socket = wire(1 << 20);
        outbox.attach(socket.clone());
        conn.send_text("first").unwrap();
        let mut iov = Vec::new();
        assert!(outbox.begin_wait(&mut conn, &mut iov));
        assert_eq!(outbox.phase(), WritePhase::Waiting);
        assert!(
            !outbox.begin_wait(&mut conn, &mut Vec::new()),
            "one at a time"
        );
        feed.borrow_mut().push(&text("later"));
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert!(done.wake_driver);
        assert!(socket.written.borrow().is_empty());
        assert_eq!(iov.concat(), text("first"));
        assert_eq!(queued(&mut conn), text("later"));
        outbox.end_wait();
        assert_eq!(outbox.phase(), WritePhase::Idle);
    }

    /// Where a broadcast frame queued to a session is written from.
    #[test]
    fn schedule_names_the_writer_of_a_queued_frame() {
        let mut outbox = TestOutbox::new();
        assert_eq!(outbox.schedule(false), Schedule::WakeDriver, "not started");
        outbox.attach(wire(0));
        assert_eq!(
            outbox.schedule(true),
            Schedule::Nothing,
            "the driver is polling"
        );
        assert_eq!(outbox.schedule(false), Schedule::Flush);
        assert_eq!(outbox.schedule(false), Schedule::Nothing, "queued once");
        outbox.take_flush_turn();
        assert_eq!(outbox.schedule(false), Schedule::Flush);
        let mut conn = Connection::server(Limits::default());
        conn.send_text("x").unwrap();
        assert!(outbox.begin_wait(&mut conn, &mut Vec::new()));
        assert_eq!(
            outbox.schedule(false),
            Schedule::WakeDriver,
            "a write in flight"
        );
        outbox.detach();
        assert_eq!(outbox.phase(), WritePhase::Detached);
        assert_eq!(outbox.schedule(false), Schedule::WakeDriver);
    }

    /// A closing connection gets its Close written, and no feed frame after it.
    #[test]
    fn no_feed_frame_follows_a_close() {
        let (mut outbox, feed, mut conn) = setup(&["f1"]);
        let socket = wire(1 << 20);
        outbox.attach(socket.clone());
        conn.close(CloseCode::Normal, "").unwrap();
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert_eq!(
            done,
            WriteNow {
                open: false,
                wake_driver: false,
                wrote: true,
                queued: 0,
            }
        );
        let mut twin = Connection::server(Limits::default());
        twin.close(CloseCode::Normal, "").unwrap();
        assert_eq!(*socket.written.borrow(), queued(&mut twin));
        assert_eq!(conn.pending_output(), 0);
        assert_eq!(outbox.follow().map(|f| f.next), Some(1));
    }

    /// A follower behind the feed's start (frames it is owed are no longer held) gets
    /// nothing and is moved to the end; the write turn ends (it once looped on
    /// zero-length writes).
    #[test]
    fn a_follower_behind_the_feed_ends_its_turn_with_nothing_to_write() {
        let (mut outbox, feed, mut conn) = setup(&["kept"]);
        feed.borrow_mut().base = 2;
        let socket = wire(1 << 20);
        outbox.attach(socket.clone());
        let metrics = WorkerMetrics::default();
        let done = outbox.write_now(&mut conn, false, Some(&feed.borrow()), &metrics);
        assert_eq!(
            (done.wrote, done.queued, done.wake_driver),
            (false, 0, false)
        );
        assert_eq!(socket.writes.get(), 0);
        assert_eq!(outbox.follow().map(|f| f.next), Some(3));
    }

    /// `catch_up` moves what the feed owes into the queue, so a message sent next
    /// goes after it; a session that has ended gets nothing.
    #[test]
    fn catch_up_keeps_the_order_of_feed_frames_and_sends() {
        let (mut outbox, feed, mut conn) = setup(&["f1"]);
        assert_eq!(outbox.catch_up(&mut conn, false), 1);
        conn.send_text("after").unwrap();
        assert_eq!(queued(&mut conn), [text("f1"), text("after")].concat());
        feed.borrow_mut().push(&text("f2"));
        assert_eq!(outbox.catch_up(&mut conn, true), 0);
        assert_eq!(
            conn.pending_output(),
            0,
            "an ended session is given nothing"
        );
        assert_eq!(outbox.follow().map(|f| f.next), Some(2));
        feed.borrow_mut().push(&text("f3"));
        outbox.skip_owed();
        assert_eq!(outbox.follow().map(|f| f.next), Some(3));
        assert!(outbox.take_follow().is_some() && outbox.follow().is_none());
    }
}
