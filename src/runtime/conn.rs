//! The connection driver: one task per connection, on the core that accepted it.
//!
//! HTTP phase: read a request head (with the handshake deadline), ask the service,
//! answer, and keep the connection alive between requests. WebSocket phase: one loop
//! polls, in turn, the handler, the write in flight, the read in flight, the timer and
//! the shutdown signal. Handlers only queue frames; whatever was queued since the last
//! write goes out in one vectored write. Every way out of a connection returns here
//! and passes through [`Teardown`].

use std::cell::Cell;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_uring::net::TcpStream;

use super::buf::{BufPool, ReadBufs};
use super::http::{BodyFraming, Response, body_framing, keep_alive};
use super::service::{Context, HttpRequest, Route, Service, WebSocketHandler};
use super::session::{Decision, Disconnect, Session, wake};
use crate::config::{Config, SlowConsumerPolicy};
use crate::metrics::{CloseReason, Limit, WorkerMetrics};
use crate::proto::handshake::{self, AcceptKey, HeadReader, Request};
use crate::proto::{
    CloseCode, CloseState, Connection, Event, HandshakeLimits, Limits, Message, ProtocolError,
};

/// Everything a core's connections share. Owned by the worker, `!Send`.
pub(crate) struct WorkerCtx {
    pub(crate) config: Arc<Config>,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) cx: Context,
    pub(crate) metrics: Arc<WorkerMetrics>,
    /// Open connections in the whole process, for `max_connections`.
    pub(crate) open_global: Arc<AtomicUsize>,
    /// Open connections on this core.
    pub(crate) open_local: Cell<usize>,
    pub(crate) shutting_down: Cell<bool>,
    /// Wakes every connection when shutdown starts.
    pub(crate) shutdown: Notify,
    /// Signalled when the last connection of this core ends.
    pub(crate) drained: Notify,
    pub(crate) pool: BufPool,
    pub(crate) limits: Limits,
    pub(crate) head_limits: HandshakeLimits,
}

/// The single way out of a connection: counts it closed and releases its slot, on
/// every path, including a panicking handler (it runs on unwind too).
struct Teardown<'a> {
    ctx: &'a WorkerCtx,
    reason: CloseReason,
}

impl<'a> Teardown<'a> {
    fn new(ctx: &'a WorkerCtx) -> Self {
        ctx.metrics.accepted();
        ctx.open_local.set(ctx.open_local.get() + 1);
        Self {
            ctx,
            reason: CloseReason::IoError,
        }
    }
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let ctx = self.ctx;
        ctx.metrics.closed(self.reason);
        ctx.open_global.fetch_sub(1, Ordering::Relaxed);
        let left = ctx.open_local.get().saturating_sub(1);
        ctx.open_local.set(left);
        if left == 0 {
            ctx.drained.notify_waiters();
        }
    }
}

/// Serves one accepted connection to its end. `over_limit`: the process was already at
/// `max_connections` when it was accepted, so it gets 503.
pub(crate) async fn drive(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Rc<WorkerCtx>,
    over_limit: bool,
) {
    let mut teardown = Teardown::new(&ctx);
    let stream = Rc::new(stream);
    let _ = stream.set_nodelay(true);
    teardown.reason = serve(&stream, peer, &ctx, over_limit).await;
    tracing::debug!(%peer, reason = teardown.reason.label(), "connection ended");
    // Wakes a read still in flight (it completes with 0), so the socket is closed now.
    let _ = stream.shutdown(Shutdown::Both);
}

/// Bytes read and not yet parsed before reading pauses (the handler is not taking
/// messages); TCP flow control then slows the peer down.
const MAX_UNPARSED_INPUT: usize = 256 * 1024;

type ReadFuture = Pin<Box<dyn Future<Output = (io::Result<usize>, BytesMut)>>>;
type WriteFuture = Pin<Box<dyn Future<Output = (io::Result<()>, Vec<Bytes>)>>>;

fn start_read(stream: &Rc<TcpStream>, bufs: &mut ReadBufs) -> ReadFuture {
    let stream = stream.clone();
    let buf = bufs.next();
    Box::pin(async move { stream.read(buf).await })
}

enum ReadOutcome {
    Data(BytesMut),
    Eof,
    Timeout,
    Shutdown,
    Error(io::Error),
}

/// One read, bounded by `deadline`, cut short by shutdown when `idle`.
async fn read_once(
    stream: &Rc<TcpStream>,
    bufs: &mut ReadBufs,
    deadline: Instant,
    ctx: &WorkerCtx,
    idle: bool,
) -> ReadOutcome {
    let shutdown = ctx.shutdown.notified();
    if idle && ctx.shutting_down.get() {
        return ReadOutcome::Shutdown;
    }
    let read = start_read(stream, bufs);
    tokio::select! {
        (result, buf) = read => match result {
            Ok(0) => { bufs.recycle(buf); ReadOutcome::Eof }
            Ok(_) => ReadOutcome::Data(buf),
            Err(e) => ReadOutcome::Error(e),
        },
        () = sleep_until(deadline) => ReadOutcome::Timeout,
        () = shutdown, if idle => ReadOutcome::Shutdown,
    }
}

async fn write_bytes(
    stream: &TcpStream,
    bytes: BytesMut,
    metrics: &WorkerMetrics,
) -> io::Result<()> {
    let len = bytes.len();
    let (result, _) = stream.write_all(bytes.freeze()).await;
    metrics.bytes_out(len);
    result
}

async fn respond(
    stream: &TcpStream,
    ctx: &WorkerCtx,
    response: &Response,
    close: bool,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    response.write(&mut out, close);
    if response.status >= 400 {
        ctx.metrics.rejected(response.status);
    }
    write_bytes(stream, out, &ctx.metrics).await
}

/// The HTTP phase; hands over to the WebSocket phase on an upgrade.
async fn serve(
    stream: &Rc<TcpStream>,
    peer: SocketAddr,
    ctx: &WorkerCtx,
    over_limit: bool,
) -> CloseReason {
    let config = &ctx.config;
    let mut bufs = ReadBufs::new(ctx.pool.clone());
    let mut leftover = Bytes::new();
    let mut first = true;
    loop {
        // ---- the request head, within the handshake deadline
        let deadline = Instant::now() + config.handshake_timeout();
        let mut reader = HeadReader::new(ctx.head_limits);
        let mut parsed = if leftover.is_empty() {
            Ok(None)
        } else {
            reader.handle_bytes(&leftover)
        };
        let (request, rest) = loop {
            match parsed {
                Ok(Some(done)) => break done,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "request refused");
                    if e.status() == 431 {
                        ctx.metrics.limit_hit(Limit::HeadSize);
                    }
                    let mut out = BytesMut::new();
                    e.write_response(&mut out);
                    ctx.metrics.rejected(e.status());
                    let _ = write_bytes(stream, out, &ctx.metrics).await;
                    return CloseReason::Rejected;
                }
                Ok(None) => {}
            }
            let idle = reader.buffered() == 0;
            match read_once(stream, &mut bufs, deadline, ctx, idle).await {
                ReadOutcome::Data(buf) => {
                    parsed = reader.handle_bytes(&buf);
                    bufs.recycle(buf);
                }
                ReadOutcome::Eof if idle && !first => return CloseReason::HttpDone,
                ReadOutcome::Eof => return CloseReason::PeerGone,
                ReadOutcome::Timeout if idle && !first => return CloseReason::HttpDone,
                ReadOutcome::Timeout => {
                    tracing::debug!(%peer, "request head not complete within the handshake timeout");
                    let response = Response::error(408, "request head not received in time");
                    let _ = respond(stream, ctx, &response, true).await;
                    return CloseReason::HandshakeTimeout;
                }
                ReadOutcome::Shutdown => return CloseReason::Shutdown,
                ReadOutcome::Error(e) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    return CloseReason::IoError;
                }
            }
        };
        first = false;
        if over_limit {
            ctx.metrics.limit_hit(Limit::MaxConnections);
            tracing::warn!(%peer, limit = config.max_connections, "max_connections reached: 503");
            let response =
                Response::error(503, "server at max_connections").with_header("Retry-After", "1");
            let _ = respond(stream, ctx, &response, true).await;
            return CloseReason::Rejected;
        }
        if ctx.shutting_down.get() {
            let response = Response::error(503, "server shutting down");
            let _ = respond(stream, ctx, &response, true).await;
            return CloseReason::Shutdown;
        }
        let keep = keep_alive(&request);
        match ctx.service.route(&request, peer, &ctx.cx) {
            Route::Respond(response) => {
                // A body we did not read would be taken for the next request: close.
                let close = !keep || body_framing(&request, 0) != Ok(BodyFraming::None);
                ctx.metrics.http_request();
                if respond(stream, ctx, &response, close).await.is_err() {
                    return CloseReason::IoError;
                }
                if close {
                    return if response.status >= 400 {
                        CloseReason::Rejected
                    } else {
                        CloseReason::HttpDone
                    };
                }
                leftover = rest;
            }
            Route::Http(handler) => {
                let framing = match body_framing(&request, config.max_body_bytes) {
                    Ok(framing) => framing,
                    Err(e) => {
                        if matches!(e, super::http::BodyError::TooLarge { .. }) {
                            ctx.metrics.limit_hit(Limit::BodySize);
                        }
                        let _ = respond(stream, ctx, &e.response(), true).await;
                        return CloseReason::Rejected;
                    }
                };
                let (body, after) = match read_body(stream, &mut bufs, rest, framing, ctx).await {
                    Ok(read) => read,
                    Err(reason) => return reason,
                };
                ctx.metrics.http_request();
                let response = handler(HttpRequest {
                    head: request,
                    body,
                    peer,
                })
                .await;
                if respond(stream, ctx, &response, !keep).await.is_err() {
                    return CloseReason::IoError;
                }
                if !keep {
                    return CloseReason::HttpDone;
                }
                leftover = after;
            }
            Route::WebSocket(handler) => {
                let accept = match request.validate_upgrade() {
                    Ok(accept) => accept,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "handshake refused");
                        let mut out = BytesMut::new();
                        e.write_response(&mut out);
                        ctx.metrics.rejected(e.status());
                        let _ = write_bytes(stream, out, &ctx.metrics).await;
                        return CloseReason::Rejected;
                    }
                };
                return websocket(stream, bufs, request, accept, rest, peer, handler, ctx).await;
            }
        }
    }
}

/// Reads a `Content-Length` body, starting with the bytes that followed the head.
async fn read_body(
    stream: &Rc<TcpStream>,
    bufs: &mut ReadBufs,
    rest: Bytes,
    framing: BodyFraming,
    ctx: &WorkerCtx,
) -> Result<(Bytes, Bytes), CloseReason> {
    let BodyFraming::Length(len) = framing else {
        return Ok((Bytes::new(), rest));
    };
    let mut body = BytesMut::from(&rest[..]);
    let deadline = Instant::now() + ctx.config.handshake_timeout();
    while body.len() < len {
        match read_once(stream, bufs, deadline, ctx, false).await {
            ReadOutcome::Data(buf) => {
                body.extend_from_slice(&buf);
                bufs.recycle(buf);
            }
            ReadOutcome::Timeout => {
                let _ = respond(
                    stream,
                    ctx,
                    &Response::error(408, "request body not received in time"),
                    true,
                )
                .await;
                return Err(CloseReason::HandshakeTimeout);
            }
            ReadOutcome::Eof | ReadOutcome::Shutdown => return Err(CloseReason::PeerGone),
            ReadOutcome::Error(_) => return Err(CloseReason::IoError),
        }
    }
    let after = body.split_off(len).freeze();
    Ok((body.freeze(), after))
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

/// The WebSocket phase: decide, answer 101, then run until the connection ends.
#[allow(clippy::too_many_arguments)] // one call site; the phases' state, handed over
async fn websocket(
    stream: &Rc<TcpStream>,
    bufs: ReadBufs,
    request: Request,
    accept: AcceptKey,
    rest: Bytes,
    peer: SocketAddr,
    handler: WebSocketHandler,
    ctx: &WorkerCtx,
) -> CloseReason {
    let config = &ctx.config;
    let session = Session::new(request, peer, Connection::server(ctx.limits));
    let mut handler = Some(handler(session.clone()));

    // ---- the handler decides, within the handshake deadline
    let deadline = Instant::now() + config.handshake_timeout();
    let decided = tokio::time::timeout_at(
        deadline,
        poll_fn(|cx| {
            if let Some(h) = handler.as_mut() {
                if h.as_mut().poll(cx).is_ready() {
                    handler = None;
                }
            }
            let mut state = session.state.borrow_mut();
            match std::mem::replace(&mut state.decision, Decision::Pending) {
                Decision::Pending if handler.is_none() => Poll::Ready(Err(Response::error(
                    403,
                    "the WebSocket handler did not accept the connection",
                ))),
                Decision::Pending => {
                    state.driver_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Decision::Accept(protocol) => {
                    state.decision = Decision::Accept(protocol.clone());
                    Poll::Ready(Ok(protocol))
                }
                Decision::Reject(response) => Poll::Ready(Err(response)),
            }
        }),
    )
    .await;
    let protocol = match decided {
        Ok(Ok(protocol)) => protocol,
        Ok(Err(response)) => {
            let _ = respond(stream, ctx, &response, true).await;
            return CloseReason::Rejected;
        }
        Err(_) => {
            tracing::warn!(%peer, "WebSocket handler did not accept or reject within the handshake timeout");
            let _ = respond(
                stream,
                ctx,
                &Response::error(503, "handler did not decide in time"),
                true,
            )
            .await;
            return CloseReason::Rejected;
        }
    };
    let mut head = BytesMut::new();
    handshake::write_accept(&mut head, &accept, protocol.as_deref(), &[]);
    ctx.metrics.upgraded();

    let mut driver = Driver {
        stream,
        ctx,
        session: &session,
        handler,
        bufs,
        read: None,
        write: None,
        iov: vec![head.freeze()],
        in_flight: 0,
        sleep: Box::pin(sleep_until(Instant::now() + config.ping_interval())),
        shutdown: Box::pin(ctx.shutdown.notified()),
        shutdown_seen: false,
        last_rx: Instant::now(),
        last_message: Instant::now(),
        ping_sent: None,
        closing_since: None,
        our_close: None,
    };
    // Frames the client sent right behind its request.
    if !rest.is_empty() {
        driver.session.state.borrow_mut().conn.handle_bytes(&rest);
    }
    // The 101 goes out first, with anything the handler queued already.
    driver.start_write();
    let reason = driver.run().await;
    let mut state = session.state.borrow_mut();
    if state.ended.is_none() {
        state.ended = Some(Disconnect::ConnectionLost);
    }
    wake(&mut state.recv_waker);
    reason
}

struct Driver<'a> {
    stream: &'a Rc<TcpStream>,
    ctx: &'a WorkerCtx,
    session: &'a Session,
    handler: Option<super::service::LocalFuture<()>>,
    bufs: ReadBufs,
    read: Option<ReadFuture>,
    write: Option<WriteFuture>,
    /// Chunks for the next write; the vector is reused between writes.
    iov: Vec<Bytes>,
    in_flight: usize,
    sleep: Pin<Box<Sleep>>,
    shutdown: Pin<Box<tokio::sync::futures::Notified<'a>>>,
    shutdown_seen: bool,
    last_rx: Instant,
    last_message: Instant,
    ping_sent: Option<Instant>,
    /// When we sent our Close (handler, idle, slow consumer, shutdown): the peer has
    /// until then plus the close timeout to answer.
    closing_since: Option<Instant>,
    /// What the session reports once our close completes.
    our_close: Option<(Disconnect, CloseReason)>,
}

impl Driver<'_> {
    async fn run(&mut self) -> CloseReason {
        loop {
            let step = poll_fn(|cx| self.poll_step(cx)).await;
            match step {
                Step::Read(Ok(0), buf) => {
                    self.bufs.recycle(buf);
                    return self.finish_on_eof();
                }
                Step::Read(Ok(n), buf) => {
                    self.last_rx = Instant::now();
                    self.ping_sent = None;
                    self.session.state.borrow_mut().conn.handle_bytes(&buf[..n]);
                    self.bufs.recycle(buf);
                }
                Step::Read(Err(e), buf) => {
                    self.bufs.recycle(buf);
                    tracing::debug!(peer = %self.session.peer, error = %e, "read failed");
                    self.end(Disconnect::ConnectionLost);
                    return CloseReason::PeerGone;
                }
                Step::WriteFailed(e) => {
                    tracing::debug!(peer = %self.session.peer, error = %e, "write failed");
                    self.end(Disconnect::ConnectionLost);
                    return CloseReason::PeerGone;
                }
                Step::Timer => {
                    if let Some(reason) = self.on_timer() {
                        return reason;
                    }
                }
                Step::Shutdown => {
                    self.shutdown_seen = true;
                    self.start_close(
                        CloseCode::Away,
                        "server shutting down",
                        Disconnect::Shutdown,
                        CloseReason::Shutdown,
                    );
                }
                Step::SlowConsumer => {
                    let policy = self.ctx.config.slow_consumer_policy;
                    let code = match policy {
                        SlowConsumerPolicy::Close1008 => CloseCode::Policy,
                        _ => CloseCode::Again,
                    };
                    self.ctx.metrics.limit_hit(Limit::OutboundBytes);
                    tracing::info!(peer = %self.session.peer, limit = self.ctx.config.max_outbound_bytes, "slow consumer closed with {code}");
                    self.session.state.borrow_mut().conn.discard_output();
                    self.start_close(
                        code,
                        "slow consumer",
                        Disconnect::SlowConsumer,
                        CloseReason::SlowConsumer,
                    );
                }
                Step::Done => return self.finish_closed(),
            }
        }
    }

    fn poll_step(&mut self, cx: &mut TaskContext<'_>) -> Poll<Step> {
        {
            let mut state = self.session.state.borrow_mut();
            state.driver_polling = true;
            if !state.driver_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                state.driver_waker = Some(cx.waker().clone());
            }
        }
        let step = self.poll_step_inner(cx);
        self.session.state.borrow_mut().driver_polling = false;
        step
    }

    fn poll_step_inner(&mut self, cx: &mut TaskContext<'_>) -> Poll<Step> {
        // The handler sees one message at a time: what it sends in reply is queued
        // before anything parsed after that message (such as a protocol error's Close).
        // Everything queued in this pass goes out in one write below.
        loop {
            if let Some(handler) = self.handler.as_mut() {
                if handler.as_mut().poll(cx).is_ready() {
                    self.handler = None;
                    // A handler that returns ends the session normally.
                    self.session.close(CloseCode::Normal, "");
                }
            }
            let ready_for_more = {
                let state = self.session.state.borrow();
                state.inbound.is_empty()
                    && state.conn.pending_input() > 0
                    && !state.conn.is_closed()
            };
            if !(ready_for_more && self.process_input()) {
                break;
            }
        }
        // A Close the handler sent: the peer has the close timeout to answer.
        if self.closing_since.is_none()
            && self.session.state.borrow().conn.close_state() == CloseState::CloseSent
        {
            self.note_close_started(Disconnect::ClosedByUs, CloseReason::Normal);
        }
        loop {
            if let Some(write) = self.write.as_mut() {
                match write.as_mut().poll(cx) {
                    Poll::Ready((Ok(()), mut iov)) => {
                        iov.clear();
                        self.iov = iov;
                        self.ctx.metrics.bytes_out(self.in_flight);
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
            let state = self.session.state.borrow();
            (state.conn.pending_output(), state.conn.is_closed())
        };
        if pending + self.in_flight > self.ctx.config.max_outbound_bytes && self.our_close.is_none()
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
                .get_or_insert_with(|| start_read(self.stream, &mut self.bufs));
            if let Poll::Ready((result, buf)) = read.as_mut().poll(cx) {
                self.read = None;
                return Poll::Ready(Step::Read(result, buf));
            }
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Step::Timer);
        }
        if !self.shutdown_seen
            && (self.shutdown.as_mut().poll(cx).is_ready() || self.ctx.shutting_down.get())
        {
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
            let mut state = self.session.state.borrow_mut();
            state.conn.drain_transmit(&mut self.iov);
            let sent = std::mem::take(&mut state.sent_messages);
            if sent > 0 {
                self.ctx.metrics.messages_out(sent);
            }
        }
        if self.iov.is_empty() {
            return false;
        }
        self.in_flight = self.iov.iter().map(Bytes::len).sum();
        let iov = std::mem::take(&mut self.iov);
        let stream = self.stream.clone();
        self.write = Some(Box::pin(write_all_vectored(stream, iov)));
        true
    }

    /// Whether to read more: not while too much input waits for the handler.
    fn wants_input(&self) -> bool {
        self.session.state.borrow().conn.pending_input() < MAX_UNPARSED_INPUT
    }

    /// Parses input up to the next message, close or error and hands it to the session.
    /// Returns whether something was delivered.
    fn process_input(&mut self) -> bool {
        let mut guard = self.session.state.borrow_mut();
        let state = &mut *guard;
        let delivered = loop {
            match state.conn.poll_event() {
                Ok(Some(Event::Text(text))) => {
                    self.ctx.metrics.message_in(text.len());
                    state.inbound.push_back(Message::Text(text));
                    break true;
                }
                Ok(Some(Event::Binary(bytes))) => {
                    self.ctx.metrics.message_in(bytes.len());
                    state.inbound.push_back(Message::Binary(bytes));
                    break true;
                }
                Ok(Some(Event::Close(frame))) => {
                    state.ended = Some(match &self.our_close {
                        Some((disconnect, _)) => disconnect.clone(),
                        None => Disconnect::Closed(frame),
                    });
                    break true;
                }
                Ok(Some(_)) => {}
                Ok(None) => break false,
                Err(e) => {
                    log_protocol_error(self.session.peer, e);
                    if matches!(
                        e,
                        ProtocolError::FrameTooLarge { .. } | ProtocolError::MessageTooLarge { .. }
                    ) {
                        self.ctx.metrics.limit_hit(Limit::MessageSize);
                    }
                    state.ended = Some(Disconnect::Protocol(e));
                    break true;
                }
            }
        };
        if delivered {
            self.last_message = Instant::now();
            // The handler is polled right after this, inline; only a session held by
            // another task needs waking.
            if !state.driver_polling {
                wake(&mut state.recv_waker);
            }
        }
        delivered
    }

    /// Sends our Close; the first reason to close is the one reported.
    fn start_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        disconnect: Disconnect,
        metric: CloseReason,
    ) {
        if self
            .session
            .state
            .borrow_mut()
            .conn
            .close(code, reason)
            .is_ok()
        {
            self.note_close_started(disconnect, metric);
        }
    }

    fn note_close_started(&mut self, disconnect: Disconnect, metric: CloseReason) {
        self.our_close = Some((disconnect, metric));
        self.closing_since = Some(Instant::now());
        // Re-arm the timer for the close deadline.
        self.sleep.as_mut().reset(Instant::now());
    }

    fn on_timer(&mut self) -> Option<CloseReason> {
        let config = &self.ctx.config;
        let now = Instant::now();
        if let Some(since) = self.closing_since {
            let limit = if self.shutdown_seen {
                config.shutdown_timeout()
            } else {
                config.pong_timeout()
            };
            if now >= since + limit {
                let (disconnect, reason) = self
                    .our_close
                    .clone()
                    .unwrap_or((Disconnect::ClosedByUs, CloseReason::Normal));
                tracing::debug!(peer = %self.session.peer, "peer did not answer our Close in time");
                self.end(disconnect);
                return Some(reason);
            }
        }
        if let Some(sent) = self.ping_sent {
            if now >= sent + config.pong_timeout() {
                tracing::debug!(peer = %self.session.peer, "no answer to ping within pong_timeout: closing");
                self.end(Disconnect::Timeout);
                return Some(CloseReason::PongTimeout);
            }
        } else if now >= self.last_rx + config.ping_interval() && self.closing_since.is_none() {
            if self.session.state.borrow_mut().conn.ping(b"").is_ok() {
                self.ctx.metrics.ping_sent();
            }
            self.ping_sent = Some(now);
        }
        if let Some(idle) = config.idle_timeout() {
            if now >= self.last_message + idle && self.closing_since.is_none() {
                self.start_close(
                    CloseCode::Away,
                    "idle timeout",
                    Disconnect::Timeout,
                    CloseReason::IdleTimeout,
                );
            }
        }
        let mut next = match self.ping_sent {
            Some(sent) => sent + config.pong_timeout(),
            None => self.last_rx + config.ping_interval(),
        };
        if let Some(idle) = config.idle_timeout() {
            next = next.min(self.last_message + idle);
        }
        if let Some(since) = self.closing_since {
            let limit = if self.shutdown_seen {
                config.shutdown_timeout()
            } else {
                config.pong_timeout()
            };
            next = next.min(since + limit);
        }
        self.sleep
            .as_mut()
            .reset(next.max(now + Duration::from_millis(1)));
        None
    }

    fn end(&mut self, disconnect: Disconnect) {
        let mut state = self.session.state.borrow_mut();
        if state.ended.is_none() {
            state.ended = Some(disconnect);
        }
        wake(&mut state.recv_waker);
    }

    fn finish_on_eof(&mut self) -> CloseReason {
        let closed = self.session.state.borrow().conn.is_closed();
        if closed {
            return self.finish_closed();
        }
        self.end(Disconnect::ConnectionLost);
        CloseReason::PeerGone
    }

    fn finish_closed(&mut self) -> CloseReason {
        let state = self.session.state.borrow();
        match (&state.ended, &self.our_close) {
            (Some(Disconnect::Protocol(_)), _) => CloseReason::ProtocolError,
            (_, Some((_, reason))) => *reason,
            _ => CloseReason::Normal,
        }
    }
}

fn log_protocol_error(peer: SocketAddr, error: ProtocolError) {
    tracing::info!(%peer, %error, "closing connection: protocol error");
}

/// Writes every chunk, continuing after partial writes, at most `IOV_MAX` chunks per
/// system call. Gives back the emptied vector for reuse.
async fn write_all_vectored(
    stream: Rc<TcpStream>,
    mut iov: Vec<Bytes>,
) -> (io::Result<()>, Vec<Bytes>) {
    const IOV_MAX: usize = 1024;
    while !iov.is_empty() {
        let tail = if iov.len() > IOV_MAX {
            iov.split_off(IOV_MAX)
        } else {
            Vec::new()
        };
        let (result, mut head) = stream.writev(iov).await;
        let mut written = match result {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), head),
            Ok(n) => n,
            Err(e) => return (Err(e), head),
        };
        let mut done = 0;
        while done < head.len() && written >= head[done].len() {
            written -= head[done].len();
            done += 1;
        }
        if done < head.len() {
            head[done].advance(written);
        }
        head.drain(..done);
        head.extend(tail);
        iov = head;
    }
    (Ok(()), iov)
}
