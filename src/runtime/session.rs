//! The WebSocket session a handler holds: the runtime's side of `recv`, `send` and
//! `close`. It lives on the core that owns the connection (`!Send`).
//!
//! Sending only queues frames in the connection's sans-IO state; the connection's
//! driver gathers everything queued since its last write into one vectored write.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::Bytes;

use super::core::outbox::{Outbox, Schedule};
use super::core::transport::Socket;
use super::http::Response;
use super::registry::Deadline;
use crate::proto::handshake::Request;
use crate::proto::{CloseCode, CloseFrame, Connection, Message, ProtocolError};

/// Why a session's stream of messages ended: `WebSocketDisconnect`, told apart.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Disconnect {
    /// The peer started the closing handshake; its close frame (`None`: no code, 1005).
    Closed(Option<CloseFrame>),
    /// We closed (the handler or the server) and the handshake completed or timed out.
    ClosedByUs,
    /// The peer broke the protocol; the connection was failed with this error.
    Protocol(ProtocolError),
    /// The peer went silent: no answer to a ping, or the idle timeout.
    Timeout,
    /// The peer did not read fast enough and was closed as a slow consumer.
    SlowConsumer,
    /// The server is shutting down (the peer was sent 1001).
    Shutdown,
    /// The TCP connection ended without a closing handshake.
    ConnectionLost,
    /// `recv` was called before the handshake was accepted: call `accept` first.
    NotAccepted,
}

impl Disconnect {
    /// Whether the session ended with a completed closing handshake.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Closed(_) | Self::ClosedByUs)
    }

    /// The close code, as reported to the application (1005 when none was sent,
    /// 1006 when there was no closing handshake).
    pub fn code(&self) -> CloseCode {
        match self {
            Self::Closed(Some(frame)) => frame.code,
            Self::Closed(None) => CloseCode::Status,
            Self::ClosedByUs => CloseCode::Normal,
            Self::Protocol(e) => e.close_code(),
            Self::Timeout | Self::ConnectionLost | Self::NotAccepted => CloseCode::Abnormal,
            Self::SlowConsumer => CloseCode::Again,
            Self::Shutdown => CloseCode::Away,
        }
    }
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed(Some(frame)) => {
                write!(f, "closed by peer ({} {:?})", frame.code, frame.reason)
            }
            Self::Closed(None) => f.write_str("closed by peer (no status)"),
            Self::ClosedByUs => f.write_str("closed"),
            Self::Protocol(e) => write!(f, "protocol error: {e}"),
            Self::Timeout => f.write_str("timed out"),
            Self::SlowConsumer => f.write_str("closed as a slow consumer"),
            Self::Shutdown => f.write_str("server shutting down"),
            Self::ConnectionLost => f.write_str("connection lost without a close"),
            Self::NotAccepted => f.write_str(
                "recv() before accept(): the handshake is still pending; call accept() first",
            ),
        }
    }
}

impl std::error::Error for Disconnect {}

/// The handshake decision a handler makes.
#[derive(Debug)]
pub(crate) enum Decision {
    Pending,
    /// Boxed although a `String` is on the heap already: the decision stays in the
    /// session for its whole life, and a pointer is 16 bytes smaller.
    #[allow(clippy::box_collection)]
    Accept(Option<Box<String>>),
    Reject(Box<Response>),
}

thread_local! {
    /// Times a handler on this core called `recv` before `accept` (for the log's
    /// throttle).
    static NOT_ACCEPTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A session's outbox: its feed is a topic's feed on this core, its transport the
/// io_uring backend's socket.
pub(crate) type SessionOutbox = Outbox<Rc<super::Feed>, Socket>;

type TeardownHooks = Vec<Box<dyn FnOnce()>>;

pub(crate) struct State {
    pub(crate) decision: Decision,
    pub(crate) conn: Connection,
    pub(crate) inbound: VecDeque<Message>,
    /// Boxed: it is set once, at the end (an idle session does not pay for it).
    pub(crate) ended: Option<Box<Disconnect>>,
    /// The task waiting in `recv`.
    pub(crate) recv_waker: Option<Waker>,
    /// The connection's driver, woken when output is queued or a decision made.
    pub(crate) driver_waker: Option<Waker>,
    /// Whether the driver is polling right now (it polls the handler inline, so the
    /// handler's sends need not wake it).
    pub(crate) driver_polling: bool,
    /// The driver's next timer deadline, checked by the core's housekeeping tick.
    pub(crate) deadline: Deadline,
    /// Set by the housekeeping tick when `deadline` has passed.
    pub(crate) timer_due: bool,
    /// Set when the server shuts down.
    pub(crate) shutdown: bool,
    /// The write side: who writes, the socket, the feed followed (see `core::outbox`).
    pub(crate) out: SessionOutbox,
    /// Messages queued since they were last counted as sent (at the next write).
    /// (32 bits: it is counted at every write, and a session stays in its size class.)
    pub(crate) sent_messages: u32,
    /// Run once when the session ends, on every way out (ARCHITECTURE.md rule 6): the
    /// layers above unregister the session here (e.g. its topic subscriptions).
    /// Boxed: most sessions register none.
    pub(crate) teardown: Option<Box<TeardownHooks>>,
    /// Set once the teardown hooks have run; hooks registered later run at once.
    pub(crate) torn_down: bool,
}

/// A WebSocket connection as its handler sees it. Clones share the connection (a
/// handle is one pointer).
#[derive(Clone)]
pub struct Session {
    pub(crate) inner: Rc<SessionInner>,
}

/// Everything a session holds, in one allocation.
pub(crate) struct SessionInner {
    pub(crate) state: RefCell<State>,
    pub(crate) request: Request,
    pub(crate) peer: SocketAddr,
}

impl Session {
    pub(crate) fn new(request: Request, peer: SocketAddr, conn: Connection) -> Self {
        Self {
            inner: Rc::new(SessionInner {
                state: RefCell::new(State {
                    decision: Decision::Pending,
                    conn,
                    inbound: VecDeque::new(),
                    ended: None,
                    recv_waker: None,
                    driver_waker: None,
                    driver_polling: false,
                    deadline: Deadline::NONE,
                    timer_due: false,
                    shutdown: false,
                    out: Outbox::new(),
                    sent_messages: 0,
                    teardown: None,
                    torn_down: false,
                }),
                request,
                peer,
            }),
        }
    }

    pub(crate) fn state(&self) -> &RefCell<State> {
        &self.inner.state
    }

    /// The upgrade request: method, path, query, `Origin` and every header field
    /// but the four the handshake consumed (`Upgrade`, `Connection`,
    /// `Sec-WebSocket-Key`, `Sec-WebSocket-Version`; see [`Request::into_upgraded`]).
    pub fn request(&self) -> &Request {
        &self.inner.request
    }

    /// The client's address: the TCP peer, or the source of its PROXY protocol header
    /// (`proxy_protocol`), or what a trusted proxy's `Forwarded` / `X-Forwarded-For`
    /// names (`trusted_proxies`; port 0 when the header gives none).
    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    /// Accepts the handshake, optionally with a subprotocol the client offered (see
    /// `Request::select_protocol`). Messages sent from now on follow the 101 response.
    pub fn accept(&self, protocol: Option<&str>) {
        let mut state = self.state().borrow_mut();
        if matches!(state.decision, Decision::Pending) {
            state.decision = Decision::Accept(protocol.map(|p| Box::new(p.to_owned())));
            wake(&mut state.driver_waker);
        }
    }

    /// Refuses the handshake with `response` (e.g. 403). Only before `accept`.
    pub fn reject(&self, response: Response) {
        let mut state = self.state().borrow_mut();
        if matches!(state.decision, Decision::Pending) {
            state.decision = Decision::Reject(Box::new(response));
            wake(&mut state.driver_waker);
        }
    }

    /// The next message, or why the connection ended. Pings, pongs and the closing
    /// handshake are handled by the runtime. Before [`Session::accept`] no message
    /// can arrive: it returns [`Disconnect::NotAccepted`] at once (and logs it)
    /// instead of waiting for ever.
    pub async fn recv(&self) -> Result<Message, Disconnect> {
        poll_fn(|cx| {
            let mut state = self.state().borrow_mut();
            if matches!(state.decision, Decision::Pending) {
                // Logged at the 1st, 2nd, 4th, 8th, ... time on this core: a handler
                // that calls it in a loop does not flood the log.
                let times = NOT_ACCEPTED.with(|n| {
                    n.set(n.get().saturating_add(1));
                    n.get()
                });
                if times.is_power_of_two() {
                    tracing::warn!(
                        peer = %self.inner.peer,
                        path = self.inner.request.path(),
                        times,
                        "WebSocket handler called recv() before accept(): call accept() (or reject()) first"
                    );
                }
                return Poll::Ready(Err(Disconnect::NotAccepted));
            }
            if let Some(message) = state.inbound.pop_front() {
                return Poll::Ready(Ok(message));
            }
            if let Some(ended) = &state.ended {
                return Poll::Ready(Err((**ended).clone()));
            }
            if !state
                .recv_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.recv_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Queues a message. It is written with everything else queued for this connection
    /// in the driver's next write.
    pub fn send(&self, message: Message) -> Result<(), Disconnect> {
        let mut state = self.state().borrow_mut();
        if let Some(ended) = &state.ended {
            return Err((**ended).clone());
        }
        // Broadcasts published before this go first.
        state.catch_up();
        if state.conn.send(message).is_err() {
            return Err(Disconnect::ClosedByUs);
        }
        state.count_queued(1);
        if !state.driver_polling {
            wake(&mut state.driver_waker);
        }
        Ok(())
    }

    /// Queues a frame encoded once for many connections (see
    /// [`encode_server_frame`](crate::proto::conn::encode_server_frame)): the queue holds a
    /// reference-counted clone. Counts as one message sent.
    ///
    /// The core's flusher writes it (with whatever else is queued by then), not the
    /// connection's task: a broadcast wakes no task per subscriber (see `flush`).
    pub fn send_frame(&self, frame: Bytes) -> Result<(), Disconnect> {
        let mut state = self.state().borrow_mut();
        if let Some(ended) = &state.ended {
            return Err((**ended).clone());
        }
        state.catch_up();
        if state.conn.send_frame(frame).is_err() {
            return Err(Disconnect::ClosedByUs);
        }
        state.count_queued(1);
        let polling = state.driver_polling;
        match state.out.schedule(polling) {
            Schedule::Nothing => {}
            Schedule::WakeDriver => wake(&mut state.driver_waker),
            Schedule::Flush => {
                drop(state);
                super::flush::enqueue(self.inner.clone());
            }
        }
        Ok(())
    }

    /// An accepted session with no driver (tests): what is queued for it stays in its
    /// queue, and the flusher queues there what a feed owes it.
    #[cfg(test)]
    pub(crate) fn driverless() -> Self {
        let (request, _) = crate::proto::handshake::parse_request(
            b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n",
            &crate::proto::HandshakeLimits::default(),
        )
        .unwrap()
        .unwrap();
        let session = Self::new(
            request,
            "127.0.0.1:1".parse().unwrap(),
            Connection::server(crate::proto::Limits::default()),
        );
        session.accept(None);
        session
    }

    /// Everything queued for this session, taken out of its queue, after what the feed
    /// it follows owes it (tests).
    #[cfg(test)]
    pub(crate) fn take_queued(&self) -> Vec<u8> {
        let mut state = self.state().borrow_mut();
        state.catch_up();
        let mut chunks = Vec::new();
        state.conn.drain_transmit(&mut chunks);
        chunks.concat()
    }

    /// Whether messages can still be sent: the session has not ended and no Close has
    /// been sent.
    /// The level and minimum size of permessage-deflate when this connection takes the
    /// compressed frames shared by a broadcast (negotiated, with the full window);
    /// `None` when it is sent plain frames.
    pub(crate) fn shared_deflate(&self) -> Option<(u32, usize)> {
        let state = self.state().borrow();
        let deflate = state.conn.deflate()?;
        deflate
            .takes_shared_frames()
            .then(|| (deflate.level(), deflate.min_bytes()))
    }

    pub(crate) fn can_send(&self) -> bool {
        let state = self.state().borrow();
        state.ended.is_none() && state.conn.close_state() == crate::proto::CloseState::Open
    }

    /// Bytes queued for this connection and not yet handed to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.state().borrow().conn.pending_output()
    }

    /// A number that identifies this session among the live sessions of its core.
    pub fn id(&self) -> usize {
        self.inner.id()
    }

    /// Registers `hook` to run once when the session ends, however it ends. Runs at
    /// once if it has ended already.
    pub(crate) fn on_teardown(&self, hook: Box<dyn FnOnce()>) {
        let mut state = self.state().borrow_mut();
        if state.torn_down {
            drop(state);
            hook();
        } else {
            state.teardown.get_or_insert_default().push(hook);
        }
    }

    /// Runs the teardown hooks (once; later calls find none).
    pub(crate) fn run_teardown(&self) {
        super::feed::unfollow(self);
        let hooks = {
            let mut state = self.state().borrow_mut();
            state.torn_down = true;
            state.teardown.take()
        };
        for hook in hooks.into_iter().flat_map(|hooks| *hooks) {
            hook();
        }
    }

    /// Queues a text message.
    pub fn send_text(&self, text: impl Into<crate::proto::Utf8Bytes>) -> Result<(), Disconnect> {
        self.send(Message::Text(text.into()))
    }

    /// Queues a binary message.
    pub fn send_binary(&self, bytes: impl Into<Bytes>) -> Result<(), Disconnect> {
        self.send(Message::Binary(bytes.into()))
    }

    /// Starts the closing handshake. `recv` then ends with [`Disconnect::ClosedByUs`]
    /// once the peer answers (or the close times out).
    pub fn close(&self, code: CloseCode, reason: &str) {
        let mut state = self.state().borrow_mut();
        // Broadcasts published before the Close go out before it.
        state.catch_up();
        if state.conn.close(code, reason).is_ok() && !state.driver_polling {
            wake(&mut state.driver_waker);
        }
    }

    /// Whether the handshake was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self.state().borrow().decision, Decision::Accept(_))
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.inner.peer)
            .field("path", &self.inner.request.path())
            .finish()
    }
}

impl State {
    /// Moves what the feed this session follows owes it into its queue, so that what
    /// is queued next goes after it.
    pub(crate) fn catch_up(&mut self) {
        let ended = self.ended.is_some();
        let queued = self.out.catch_up(&mut self.conn, ended);
        self.count_queued(queued);
    }

    /// Counts `n` messages queued (counted as sent when written).
    pub(crate) fn count_queued(&mut self, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        self.sent_messages = self.sent_messages.saturating_add(n);
    }

    /// One write turn of the outbox (see [`Outbox::write_now`]): `feed` is the view of
    /// the feed this session follows, if any. Wakes the driver for what is left.
    /// Returns whether the connection can still take data.
    pub(crate) fn write_now(
        &mut self,
        feed: Option<&super::feed::FeedInner>,
        metrics: &crate::metrics::WorkerMetrics,
    ) -> bool {
        let ended = self.ended.is_some();
        let outcome = self.out.write_now(&mut self.conn, ended, feed, metrics);
        self.count_queued(outcome.queued);
        if outcome.wrote {
            let messages = std::mem::take(&mut self.sent_messages);
            if messages > 0 {
                metrics.messages_out(u64::from(messages));
            }
        }
        if outcome.wake_driver {
            wake(&mut self.driver_waker);
        }
        outcome.open
    }
}

/// Writes what `session` has queued with non-blocking writes, or hands it to its
/// driver: its turn in the core's flush queue, and the driver's first write (the 101
/// and what the handler queued behind it), made when the driver starts.
pub(crate) fn write_queued(session: &SessionInner, metrics: &crate::metrics::WorkerMetrics) {
    let mut state = session.state.borrow_mut();
    state.out.take_flush_turn();
    let feed = state.out.follow().map(|follow| follow.feed.clone());
    // The feed is only borrowed mutably while it appends or trims.
    let view = feed
        .as_ref()
        .and_then(|feed| feed.inner().try_borrow().ok());
    state.write_now(view.as_deref(), metrics);
}

impl SessionInner {
    /// [`Session::id`]: the one place a session's id is derived (the feed reports
    /// closing followers by it too).
    pub(crate) fn id(self: &Rc<Self>) -> usize {
        Rc::as_ptr(self) as usize
    }
}

impl super::flush::Flush for SessionInner {
    fn flush(&self, _budget: usize, metrics: &crate::metrics::WorkerMetrics) -> (usize, bool) {
        write_queued(self, metrics);
        (1, false)
    }
}

pub(crate) fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}
