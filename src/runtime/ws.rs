//! The WebSocket session driver: the task that owns an accepted connection.
//!
//! Each poll runs, in turn: the handler (inline, one message at a time, so whatever it
//! sends in reply is queued before anything parsed after that message), the write in
//! flight, the read in flight (paused while too much input waits for the handler), the
//! timer (woken by the core's housekeeping tick) and the shutdown flag. Handlers only
//! queue frames; whatever was queued since the last write goes out in one vectored
//! write (ARCHITECTURE.md rule 4). The driver is the task's whole state: an idle
//! connection costs this struct, its session and one small pending read.
//!
//! Heartbeat, pong, idle and close timeouts are decided in `core::timers`
//! ([`ConnTimers`]); the driver tells it what was read, delivered and sent, reads the
//! clock for it, takes the actions it returns and records its `poll_timeout` as the
//! session's deadline for the core's tick.
//!
//! The limits on what the peer sends are applied where its input is parsed: the message
//! and control frame rates in `core::limits` ([`ConnLimits`], asked by
//! `process_input`), the process's budget for partial messages in `inbound` (charged by
//! `charge_inbound` after each parse pass, given back in `Drop`).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::buf::ReadBufs;
use super::core::limits::{ConnLimits, Verdict};
use super::core::timers::{ConnTimers, TimerAction};
use super::ctx::{ConnGuard, ReadFuture, start_read};
use super::inbound;
use super::registry::Deadline;
use super::service::{LocalFuture, Polled, poll_handler};
use super::session::{Disconnect, Session, wake};
use crate::config::{RateLimitPolicy, SlowConsumerPolicy};
use crate::metrics::{CloseReason, HandlerKind, Limit, Rejection};
use crate::proto::{CloseCode, CloseState, Event, Message, ProtocolError};

/// Bytes read and not yet parsed before reading pauses (the handler is not taking
/// messages); TCP flow control then slows the peer down.
const MAX_UNPARSED_INPUT: usize = 256 * 1024;

type WriteFuture = Pin<Box<dyn Future<Output = (io::Result<()>, Vec<Bytes>)>>>;

/// A limit on what the peer sends that closes the connection.
#[derive(Debug, Clone, Copy)]
enum LimitClose {
    /// `max_messages_per_sec` with `rate_limit_policy = close`: 1008 "rate limit".
    Messages,
    /// `max_control_frames_per_sec`: 1008 "too many control frames".
    Controls,
    /// `max_inbound_memory`: 1013 "server busy: inbound memory".
    InboundMemory,
}

/// What woke the WebSocket loop.
enum Step {
    Read(io::Result<usize>, BytesMut),
    Timer,
    Shutdown,
    WriteFailed(io::Error),
    SlowConsumer,
    Done,
}

/// An accepted WebSocket connection, run as its own task until it ends.
pub(crate) struct Driver {
    guard: ConnGuard,
    session: Session,
    /// The session's place in the core's registry.
    slot: usize,
    handler: Option<LocalFuture<()>>,
    bufs: ReadBufs,
    read: Option<ReadFuture>,
    write: Option<WriteFuture>,
    /// Chunks for the next write; the vector is reused between writes.
    iov: Vec<Bytes>,
    in_flight: usize,
    /// Heartbeat, pong, idle and close timeouts (the durations are the core's
    /// `WorkerCtx::timers`).
    timers: ConnTimers,
    /// The message and control frame rate limits (the rates are the core's
    /// `WorkerCtx::conn_limits`).
    limits: ConnLimits,
    /// Bytes of a partial message charged to the process's `WorkerCtx::inbound` budget.
    inbound_charged: u32,
    /// Set once we sent our Close (handler, idle, slow consumer, shutdown); when, and
    /// how long the peer has to answer, is in `timers`.
    /// Boxed: only a closing connection has it.
    closing: Option<Box<Closing>>,
}

/// Our side of a closing handshake in progress.
struct Closing {
    /// What the session reports once our close completes.
    disconnect: Disconnect,
    reason: CloseReason,
}

impl Driver {
    /// The driver of an accepted session, whose queue starts with the 101 response.
    /// What the socket takes of that queue at once is written here, without an io_uring
    /// write (see `session::write_queued`); the driver writes the rest.
    pub(crate) fn new(
        guard: ConnGuard,
        session: Session,
        handler: Option<LocalFuture<()>>,
        bufs: ReadBufs,
    ) -> Self {
        let slot = guard.ctx.sessions.borrow_mut().insert(&session.inner);
        let now = Instant::now().into_std();
        let timers = ConnTimers::new(now);
        let limits = ConnLimits::new(now, &guard.ctx.conn_limits);
        session.state().borrow_mut().deadline = timers
            .poll_timeout(&guard.ctx.timers)
            .map_or(Deadline::NONE, Deadline::at);
        let driver = Self {
            guard,
            session,
            slot,
            handler,
            bufs,
            read: None,
            write: None,
            iov: Vec::new(),
            in_flight: 0,
            timers,
            limits,
            inbound_charged: 0,
            closing: None,
        };
        // Attached once the driver exists: its `Drop` (which detaches) then runs on
        // every way out, a panic in the first write included.
        driver
            .session
            .state()
            .borrow_mut()
            .out
            .attach(driver.guard.stream.clone());
        super::session::write_queued(&driver.session.inner, &driver.guard.ctx.metrics);
        driver
    }

    /// Acts on what woke the driver; `Some` when the connection is over.
    fn handle(&mut self, step: Step) -> Option<CloseReason> {
        {
            match step {
                Step::Read(Ok(0), buf) => {
                    self.bufs.recycle(buf, self.guard.stream.as_raw_fd());
                    return Some(self.finish_on_eof());
                }
                Step::Read(Ok(n), buf) => {
                    self.timers.handle_bytes_received(Instant::now().into_std());
                    self.session
                        .state()
                        .borrow_mut()
                        .conn
                        .handle_bytes(&buf[..n]);
                    self.bufs.recycle(buf, self.guard.stream.as_raw_fd());
                }
                Step::Read(Err(e), buf) => {
                    self.bufs.recycle(buf, self.guard.stream.as_raw_fd());
                    tracing::debug!(peer = %self.session.peer(), error = %e, "read failed");
                    self.end(Disconnect::ConnectionLost);
                    return Some(CloseReason::PeerGone);
                }
                Step::WriteFailed(e) => {
                    tracing::debug!(peer = %self.session.peer(), error = %e, "write failed");
                    self.end(Disconnect::ConnectionLost);
                    return Some(CloseReason::PeerGone);
                }
                Step::Timer => {
                    return self.on_timer();
                }
                Step::Shutdown => {
                    self.timers.handle_shutdown();
                    self.start_close(
                        CloseCode::Away,
                        "server shutting down",
                        Disconnect::Shutdown,
                        CloseReason::Shutdown,
                    );
                    // A Close already out now has `shutdown_timeout`, which may be
                    // sooner than the deadline armed for it.
                    self.arm_timer();
                }
                Step::SlowConsumer => {
                    let policy = self.guard.ctx.config.slow_consumer_policy;
                    let code = match policy {
                        SlowConsumerPolicy::Close1008 => CloseCode::Policy,
                        _ => CloseCode::Again,
                    };
                    self.guard.ctx.metrics.limit_hit(Limit::OutboundBytes);
                    tracing::info!(peer = %self.session.peer(), limit = self.guard.ctx.config.max_outbound_bytes, "slow consumer closed with {code}");
                    {
                        let mut state = self.session.state().borrow_mut();
                        state.out.skip_owed();
                        state.conn.discard_output();
                    }
                    self.start_close(
                        code,
                        "slow consumer",
                        Disconnect::SlowConsumer,
                        CloseReason::SlowConsumer,
                    );
                }
                Step::Done => return Some(self.finish_closed()),
            }
        }
        None
    }

    fn poll_step(&mut self, cx: &mut TaskContext<'_>) -> Poll<Step> {
        {
            let mut state = self.session.state().borrow_mut();
            state.driver_polling = true;
            if !state
                .driver_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                state.driver_waker = Some(cx.waker().clone());
            }
        }
        let step = self.poll_step_inner(cx);
        self.session.state().borrow_mut().driver_polling = false;
        step
    }

    fn poll_step_inner(&mut self, cx: &mut TaskContext<'_>) -> Poll<Step> {
        // The handler sees one message at a time: what it sends in reply is queued
        // before anything parsed after that message (such as a protocol error's Close).
        // Everything queued in this pass goes out in one write below.
        let mut delivered = false;
        loop {
            if let Some(handler) = self.handler.as_mut() {
                match poll_handler(handler, cx) {
                    Polled::Pending => {}
                    Polled::Ready(()) => {
                        self.handler = None;
                        // A handler that returns ends the session normally.
                        self.session.close(CloseCode::Normal, "");
                    }
                    Polled::Panicked(message) => {
                        tracing::error!(peer = %self.session.peer(), panic = %message, "WebSocket handler panicked: closing with 1011");
                        self.guard
                            .ctx
                            .metrics
                            .handler_panicked(HandlerKind::WebSocket);
                        self.handler = None;
                        self.session.close(CloseCode::Error, "internal error");
                    }
                }
            }
            let ready_for_more = {
                let state = self.session.state().borrow();
                state.inbound.is_empty()
                    && state.conn.pending_input() > 0
                    && !state.conn.is_closed()
            };
            if !(ready_for_more && self.process_input()) {
                break;
            }
            delivered = true;
        }
        if delivered {
            // One clock read for all the messages of this pass, not one per message.
            self.timers.handle_message(Instant::now().into_std());
        }
        self.charge_inbound();
        // A Close the handler sent: the peer has the close timeout to answer.
        if self.closing.is_none()
            && self.session.state().borrow().conn.close_state() == CloseState::CloseSent
        {
            self.note_close_started(Disconnect::ClosedByUs, CloseReason::Normal);
        }
        loop {
            if let Some(write) = self.write.as_mut() {
                match write.as_mut().poll(cx) {
                    Poll::Ready((Ok(()), mut iov)) => {
                        self.session.state().borrow_mut().out.end_wait();
                        iov.clear();
                        self.iov = iov;
                        self.guard.ctx.metrics.bytes_out(self.in_flight);
                        self.in_flight = 0;
                        self.write = None;
                    }
                    Poll::Ready((Err(e), _)) => return Poll::Ready(Step::WriteFailed(e)),
                    Poll::Pending => break,
                }
            }
            if !self.start_write() {
                break;
            }
        }
        let (pending, closed) = {
            let state = self.session.state().borrow();
            (state.conn.pending_output(), state.conn.is_closed())
        };
        if pending + self.in_flight > self.guard.ctx.config.max_outbound_bytes
            && self.closing.is_none()
        {
            return Poll::Ready(Step::SlowConsumer);
        }
        if closed {
            if self.write.is_none() && pending == 0 {
                return Poll::Ready(Step::Done);
            }
        } else if self.read.is_some() || self.wants_input() {
            let read = self
                .read
                .get_or_insert_with(|| start_read(&self.guard.stream, &mut self.bufs));
            if let Poll::Ready((result, buf)) = read.as_mut().poll(cx) {
                self.read = None;
                return Poll::Ready(Step::Read(result, buf));
            }
        }
        let mut state = self.session.state().borrow_mut();
        if std::mem::take(&mut state.timer_due) {
            return Poll::Ready(Step::Timer);
        }
        if !self.timers.shutdown_seen() && (state.shutdown || self.guard.ctx.shutting_down.get()) {
            return Poll::Ready(Step::Shutdown);
        }
        Poll::Pending
    }

    /// Starts a write of everything queued, if there is something and no write in
    /// flight. Returns whether one was started.
    fn start_write(&mut self) -> bool {
        if self.write.is_some() {
            return false;
        }
        {
            let mut guard = self.session.state().borrow_mut();
            let state = &mut *guard;
            let started = state.out.begin_wait(&mut state.conn, &mut self.iov);
            let sent = std::mem::take(&mut state.sent_messages);
            if sent > 0 {
                self.guard.ctx.metrics.messages_out(u64::from(sent));
            }
            if !started {
                return false;
            }
        }
        self.in_flight = self.iov.iter().map(Bytes::len).sum();
        let iov = std::mem::take(&mut self.iov);
        let stream = self.guard.stream.clone();
        self.write = Some(Box::pin(async move { stream.writev(iov).await }));
        true
    }

    /// Whether to read more: not while too much input waits for the handler.
    fn wants_input(&self) -> bool {
        self.session.state().borrow().conn.pending_input() < MAX_UNPARSED_INPUT
    }

    /// Parses input up to the next message, close or error and hands it to the session;
    /// messages over the rate limit are dropped or close the connection, as are control
    /// frames over theirs. Returns whether something was delivered or a limit closed
    /// the connection (either way: call again while input is pending).
    fn process_input(&mut self) -> bool {
        let mut guard = self.session.state().borrow_mut();
        let state = &mut *guard;
        let ctx = &self.guard.ctx;
        let policy = &ctx.conn_limits;
        // One clock read per pass, and only when a limit needs it.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(|| Instant::now().into_std());
        let mut over = None;
        let delivered = loop {
            let message = match state.conn.poll_event() {
                Ok(Some(Event::Text(text))) => {
                    ctx.metrics.message_in(text.len());
                    Message::Text(text)
                }
                Ok(Some(Event::Binary(bytes))) => {
                    ctx.metrics.message_in(bytes.len());
                    Message::Binary(bytes)
                }
                Ok(Some(Event::Ping(_) | Event::Pong(_))) => {
                    if policy.controls.per_sec > 0 && !self.limits.handle_control(now(), policy) {
                        over = Some(LimitClose::Controls);
                        break false;
                    }
                    continue;
                }
                Ok(Some(Event::Close(frame))) => {
                    state.ended = Some(Box::new(match &self.closing {
                        Some(closing) => closing.disconnect.clone(),
                        None => Disconnect::Closed(frame),
                    }));
                    break true;
                }
                Ok(None) => break false,
                Err(e) => {
                    log_protocol_error(self.session.peer(), e);
                    if matches!(
                        e,
                        ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. }
                    ) {
                        self.guard.ctx.metrics.limit_hit(Limit::MessageSize);
                    }
                    state.ended = Some(Box::new(Disconnect::Protocol(e)));
                    break true;
                }
            };
            if policy.messages.per_sec > 0 {
                if let Verdict::OverLimit { first } = self.limits.handle_message(now(), policy) {
                    // After our Close, what is over the limit is dropped (and not counted
                    // again): the connection is ending.
                    if self.closing.is_some() {
                        continue;
                    }
                    ctx.cx.metrics.rejected(Rejection::RateLimit);
                    if first {
                        tracing::info!(peer = %self.session.peer(), limit = policy.messages.per_sec, burst = policy.messages.burst, policy = %policy.on_messages, "over max_messages_per_sec");
                    }
                    match policy.on_messages {
                        RateLimitPolicy::Drop => continue,
                        _ => {
                            over = Some(LimitClose::Messages);
                            break false;
                        }
                    }
                }
            }
            state.inbound.push_back(message);
            break true;
        };
        if delivered {
            // The handler is polled right after this, inline; only a session held by
            // another task needs waking.
            if !state.driver_polling {
                wake(&mut state.recv_waker);
            }
        }
        drop(guard);
        match over {
            Some(limit) => {
                self.close_for_limit(limit);
                // Look again: the input after it (such as the peer's Close) is parsed
                // in this pass, not after the next read.
                true
            }
            None => delivered,
        }
    }

    /// Closes the connection for a limit on what the peer sends: counts and logs it,
    /// then a Close handshake (the message rate) or a Close and no more reading (a
    /// control frame flood, the memory budget: `proto::Connection::abort`).
    fn close_for_limit(&mut self, limit: LimitClose) {
        let ctx = &self.guard.ctx;
        let peer = self.session.peer();
        match limit {
            LimitClose::Messages => {
                // Counted and logged where it was found.
                self.start_close(
                    CloseCode::Policy,
                    "rate limit",
                    Disconnect::ClosedByUs,
                    CloseReason::Rejected,
                );
                return;
            }
            LimitClose::Controls => {
                ctx.cx.metrics.rejected(Rejection::ControlFrames);
                tracing::info!(%peer, limit = ctx.conn_limits.controls.per_sec, "over max_control_frames_per_sec: closing with 1008");
            }
            LimitClose::InboundMemory => {
                ctx.cx.metrics.rejected(Rejection::InboundMemory);
                ctx.metrics.limit_hit(Limit::InboundMemory);
                tracing::info!(%peer, partial_message = self.inbound_charged, limit = ctx.config.max_inbound_memory, "max_inbound_memory is used up: closing a large partial message with 1013");
            }
        }
        let (code, reason) = match limit {
            LimitClose::InboundMemory => (CloseCode::Again, "server busy: inbound memory"),
            _ => (CloseCode::Policy, "too many control frames"),
        };
        let aborted = {
            let mut state = self.session.state().borrow_mut();
            // Broadcasts published before the Close go out before it.
            state.catch_up();
            state.conn.abort(code, reason).is_ok()
        };
        if aborted && self.closing.is_none() {
            self.note_close_started(Disconnect::ClosedByUs, CloseReason::Rejected);
        }
    }

    /// Charges what the connection now holds of a partial message to the process's
    /// budget; over budget, a connection holding more than `inbound::CLOSE_ABOVE` is
    /// closed (which gives its charge back).
    fn charge_inbound(&mut self) {
        let held = self.session.state().borrow().conn.buffered_message_bytes();
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        if held == self.inbound_charged {
            return;
        }
        let over = self
            .guard
            .ctx
            .inbound
            .recharge(&mut self.inbound_charged, held);
        if over && held as usize > inbound::CLOSE_ABOVE {
            self.close_for_limit(LimitClose::InboundMemory);
            self.release_inbound();
        }
    }

    /// Gives back the connection's charge to the budget.
    fn release_inbound(&mut self) {
        let held = self.session.state().borrow().conn.buffered_message_bytes();
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        self.guard
            .ctx
            .inbound
            .recharge(&mut self.inbound_charged, held);
    }

    /// Sends our Close; the first reason to close is the one reported.
    fn start_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        disconnect: Disconnect,
        metric: CloseReason,
    ) {
        let closed = {
            let mut state = self.session.state().borrow_mut();
            // Broadcasts published before the Close go out before it.
            state.catch_up();
            state.conn.close(code, reason).is_ok()
        };
        if closed {
            self.note_close_started(disconnect, metric);
        }
    }

    fn note_close_started(&mut self, disconnect: Disconnect, metric: CloseReason) {
        self.closing = Some(Box::new(Closing {
            disconnect,
            reason: metric,
        }));
        self.timers.handle_close_sent(Instant::now().into_std());
        // Re-arm the timer for the close deadline.
        self.arm_timer();
    }

    /// Takes the actions the timers call for; `Some` when the connection is over.
    fn on_timer(&mut self) -> Option<CloseReason> {
        let now = Instant::now().into_std();
        let policy = self.guard.ctx.timers;
        for action in self.timers.handle_timeout(now, &policy) {
            match action {
                TimerAction::CloseTimedOut => {
                    let (disconnect, reason) = match &self.closing {
                        Some(closing) => (closing.disconnect.clone(), closing.reason),
                        // Not reached: the timers learn of our Close only with `closing`.
                        None => (Disconnect::ClosedByUs, CloseReason::Normal),
                    };
                    tracing::debug!(peer = %self.session.peer(), "peer did not answer our Close in time");
                    self.end(disconnect);
                    return Some(reason);
                }
                TimerAction::PongTimedOut => {
                    tracing::debug!(peer = %self.session.peer(), "no answer to ping within pong_timeout: closing");
                    self.end(Disconnect::Timeout);
                    return Some(CloseReason::PongTimeout);
                }
                TimerAction::SendPing => {
                    if self.session.state().borrow_mut().conn.ping(b"").is_ok() {
                        self.guard.ctx.metrics.ping_sent();
                    }
                }
                TimerAction::CloseIdle => self.start_close(
                    CloseCode::Away,
                    "idle timeout",
                    Disconnect::Timeout,
                    CloseReason::IdleTimeout,
                ),
            }
        }
        self.arm_timer();
        None
    }

    /// Records the timers' next deadline where the core's housekeeping tick wakes this
    /// driver (`new` arms it the same way): when our Close goes out, at shutdown and
    /// after each timeout. Reads and messages do not re-arm (that would be a write per
    /// read); the tick comes at the deadline armed before, and `handle_timeout` takes
    /// what became due by then. That is after `poll_timeout` in one case: a ping
    /// answered when `ping_interval` is shorter than what was left of `pong_timeout`
    /// (the next ping waits for the pong deadline armed).
    fn arm_timer(&self) {
        let deadline = self.timers.poll_timeout(&self.guard.ctx.timers);
        self.session.state().borrow_mut().deadline = deadline.map_or(Deadline::NONE, Deadline::at);
    }

    fn end(&mut self, disconnect: Disconnect) {
        let mut state = self.session.state().borrow_mut();
        if state.ended.is_none() {
            state.ended = Some(Box::new(disconnect));
        }
        wake(&mut state.recv_waker);
    }

    fn finish_on_eof(&mut self) -> CloseReason {
        let closed = self.session.state().borrow().conn.is_closed();
        if closed {
            return self.finish_closed();
        }
        self.end(Disconnect::ConnectionLost);
        CloseReason::PeerGone
    }

    fn finish_closed(&mut self) -> CloseReason {
        let state = self.session.state().borrow();
        match (state.ended.as_deref(), &self.closing) {
            (Some(Disconnect::Protocol(_)), _) => CloseReason::ProtocolError,
            (_, Some(closing)) => closing.reason,
            _ => CloseReason::Normal,
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let Poll::Ready(step) = this.poll_step(cx) else {
                return Poll::Pending;
            };
            if let Some(reason) = this.handle(step) {
                this.guard.reason = reason;
                return Poll::Ready(());
            }
        }
    }
}

impl Drop for Driver {
    /// Leaves the registry and ends the session; the guard, dropped next, closes the
    /// socket and counts the connection closed. Runs on every way out, including the
    /// task being dropped at shutdown.
    fn drop(&mut self) {
        // Nothing writes to the socket any more, and the session lets go of it (it
        // closes with the guard's reference).
        self.session.state().borrow_mut().out.detach();
        self.guard.ctx.sessions.borrow_mut().remove(self.slot);
        // Whatever part of a message it holds is no longer the connection's.
        if self.inbound_charged > 0 {
            self.guard
                .ctx
                .inbound
                .recharge(&mut self.inbound_charged, 0);
        }
        self.end(Disconnect::ConnectionLost);
        self.session.run_teardown();
    }
}

fn log_protocol_error(peer: std::net::SocketAddr, error: ProtocolError) {
    tracing::info!(%peer, %error, "closing connection: protocol error");
}
