//! A connection's life on the core that accepted it.
//!
//! HTTP phase (a task per connection): read a request head within the handshake
//! deadline, ask the service, answer, keep the connection alive between requests. On a
//! WebSocket upgrade the handler decides, the 101 is queued, and the connection moves
//! into a [`Driver`](super::ws::Driver): a task that is nothing but the session's state,
//! so an idle WebSocket costs only that. Every way out of a connection, in either
//! phase, ends with its [`ConnGuard`] being dropped.

use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use super::client_addr::{canonical, forwarded_client};
use super::core::transport::Stream;
use super::ctx::{ConnGuard, Door, WorkerCtx, start_read};
use super::ip_limits::Refusal;
use super::tls::TlsStream;
use super::worker::Front;
use bytes::{Bytes, BytesMut};
use tokio::time::{Instant, sleep_until};

use super::buf::{HEAD_READ, ReadBufs};
use super::http::{BodyFraming, Response, body_framing, keep_alive};
use super::service::{HttpRequest, LocalFuture, Polled, Route, WebSocketHandler, poll_handler};
use super::session::{Decision, Session};
use super::ws::Driver;
use crate::metrics::{CloseReason, HandlerKind, Limit, Rejection, WorkerMetrics};
use crate::proto::handshake::{self, AcceptKey, HeadReader, Request};
use crate::proto::proxy::{self, ProxyError, ProxyHeader};
use crate::proto::{CloseCode, Connection};
use crate::tasks::BackgroundTasks;

/// Serves one accepted connection, from `peer` (the TCP peer), which came in on
/// `front.door`: its PROXY protocol header first (`front.proxy_protocol`), then its
/// TLS session (`front.tls`), then HTTP. `over_limit`: the process was already at
/// `max_connections` when it was accepted, so it gets 503, unless it asks for
/// `GET /healthz` or `GET /metrics` (answered as usual, then closed: a full server
/// still tells its monitoring so).
pub(crate) async fn drive(
    stream: Stream,
    mut peer: SocketAddr,
    front: Front,
    ctx: Rc<WorkerCtx>,
    over_limit: bool,
) {
    // The handshake timeout bounds the PROXY header, the TLS handshake and the first
    // request head together.
    let first_deadline = Instant::now() + ctx.config.handshake_timeout();
    if front.proxy_protocol {
        // Boxed, here and for `linger`: paths most connections never take keep their
        // state out of every connection's task.
        let failure = match Box::pin(read_proxy_header(&stream, first_deadline)).await {
            Ok(header) => {
                // LOCAL, UNKNOWN: the proxy's own connection; the peer stands.
                if let Some(addresses) = header.addresses {
                    peer = canonical(addresses.source);
                }
                None
            }
            Err(HeaderFailure::Gone) => Some(CloseReason::PeerGone),
            Err(HeaderFailure::Io(e)) => {
                tracing::debug!(%peer, error = %e, "read failed before the PROXY header");
                Some(CloseReason::IoError)
            }
            Err(cause) => {
                tracing::debug!(%peer, cause = %cause, "PROXY protocol header refused: closing");
                ctx.cx.metrics.rejected(Rejection::ProxyProtocol);
                Some(CloseReason::Rejected)
            }
        };
        if let Some(reason) = failure {
            // No answer: what protocol would follow is unknown.
            let mut guard = ConnGuard::new(ctx.clone(), Rc::new(stream), peer);
            guard.reason = reason;
            return;
        }
    }
    let stream = match front.tls {
        None => stream,
        Some(tls) => match tls.session() {
            Ok(session) => Stream::Tls(Box::new(TlsStream::new(
                stream,
                session,
                ctx.metrics.clone(),
            ))),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot start a TLS session");
                let mut guard = ConnGuard::new(ctx.clone(), Rc::new(stream), peer);
                guard.reason = CloseReason::IoError;
                return;
            }
        },
    };
    // TCP_NODELAY comes from the listener (see `listener::bind_reuseport`).
    let stream = Rc::new(stream);
    let mut guard = ConnGuard::new(ctx.clone(), stream.clone(), peer);
    let upgrade = match serve(
        &stream,
        &mut guard,
        &ctx,
        over_limit,
        first_deadline,
        front.door,
    )
    .await
    {
        Ok(reason) => {
            if reason == CloseReason::Rejected {
                Box::pin(linger(&stream, &ctx)).await;
            }
            guard.reason = reason;
            return;
        }
        Err(upgrade) => upgrade,
    };
    let Upgrade {
        mut bufs,
        request,
        accept,
        rest,
        handler,
    } = *upgrade;
    // The request head's size says nothing about the frames to come: an idle
    // WebSocket waits on a small buffer.
    bufs.reset();
    let mut conn = Connection::server(ctx.limits);
    // permessage-deflate, if offered and on; the window reserved for the client is
    // given back with the guard, however the connection ends.
    let extension = ctx.compression.negotiate(&request).map(|agreed| {
        // At most 2^15 bytes: a u32 keeps the guard within its size class.
        guard.compression_window = u32::try_from(agreed.reserved).unwrap_or(u32::MAX);
        ctx.cx
            .metrics
            .deflate_negotiated(agreed.codec.peer_keeps_context());
        conn.set_deflate(agreed.codec);
        agreed.response
    });
    let session = Session::new(request.into_upgraded(), guard.peer, conn);
    let mut handler = Some(handler(session.clone()));
    match decide(
        &stream,
        &session,
        &mut handler,
        &accept,
        extension.as_deref(),
        &ctx,
    )
    .await
    {
        Ok(head) => {
            {
                let mut state = session.state().borrow_mut();
                // The 101 goes out first, with whatever the handler queued behind it.
                state.conn.send_raw_first(head);
                // Frames the client sent right behind its request.
                if !rest.is_empty() {
                    state.conn.handle_bytes(&rest);
                }
            }
            drop(rest);
            // A handler that accepted and returned without ever waiting ends the
            // session normally, as it would in the driver: Close 1000 after its sends.
            if handler.is_none() {
                session.close(CloseCode::Normal, "");
            }
            // The session gets its own task, sized to its state alone.
            tokio::task::spawn_local(Driver::new(guard, session, handler, bufs));
        }
        Err(reason) => {
            // Refused after the handler may have registered hooks (e.g. it accepted,
            // subscribed, then panicked): unregister it here, as the driver would.
            session.run_teardown();
            if reason == CloseReason::Rejected {
                Box::pin(linger(&stream, &ctx)).await;
            }
            guard.reason = reason;
        }
    }
}

/// How long a lingering close reads on, at most (see [`linger`]).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);

/// How many bytes a lingering close reads and discards, at most (see [`linger`]).
pub(crate) const LINGER_BYTES: usize = 8 << 20;

/// A lingering close, as nginx's `lingering_close`, after an error answer (431, 413,
/// 400, 503 …) to a client that may still be sending: closing a socket with unread
/// input makes the kernel send a reset, and a client still writing then gets
/// `EPIPE`/`ECONNRESET` and may never read the answer (some stacks drop it).
/// So: the answer is already written (with TLS: encrypted and handed to the socket,
/// since the write waits for all of it), the write side is shut down (FIN after the
/// answer), and the input is read and discarded until the client closes, for at most
/// [`LINGER_TIME`] and [`LINGER_BYTES`], or until the server shuts down. Only then does
/// the connection's guard close the socket. The client's bytes are never parsed.
async fn linger(stream: &Rc<Stream>, ctx: &WorkerCtx) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut bufs = ReadBufs::with_first(ctx.pool.clone(), HEAD_READ);
    let mut discarded = 0usize;
    while discarded < LINGER_BYTES {
        match read_once(stream, &mut bufs, deadline, ctx, true).await {
            ReadOutcome::Data(buf) => {
                discarded = discarded.saturating_add(buf.len());
                bufs.recycle(buf, stream.as_raw_fd());
            }
            ReadOutcome::Eof
            | ReadOutcome::Timeout
            | ReadOutcome::Shutdown
            | ReadOutcome::Error(_) => break,
        }
    }
}

/// Why no PROXY header came.
#[derive(Debug)]
enum HeaderFailure {
    /// The peer closed before sending a byte (e.g. a TCP health check).
    Gone,
    /// The peer closed within the header.
    Truncated,
    /// Not complete within the handshake timeout.
    Timeout,
    Invalid(ProxyError),
    Io(io::Error),
}

impl std::fmt::Display for HeaderFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone => f.write_str("closed before a PROXY header"),
            Self::Truncated => f.write_str("closed within the PROXY header"),
            Self::Timeout => f.write_str("no complete PROXY header within the handshake timeout"),
            Self::Invalid(e) => e.fmt(f),
            Self::Io(e) => e.fmt(f),
        }
    }
}

/// Reads the PROXY protocol header at the start of `stream` (below TLS) and no byte
/// beyond it: what follows stays in the socket for TLS or HTTP. The socket's bytes
/// are peeked (`MSG_PEEK`) and exactly the header's are then taken; a header that
/// arrives in pieces is read a bounded piece at a time (`proxy::needed`).
async fn read_proxy_header(
    stream: &Stream,
    deadline: Instant,
) -> Result<ProxyHeader, HeaderFailure> {
    let mut header = Vec::new();
    // Accepts are deferred until the first bytes are in: usually the whole header.
    let mut peeked = BytesMut::with_capacity(proxy::MAX_HEADER_LEN);
    match stream.peek_now(&mut peeked) {
        Some(Ok(0)) => return Err(HeaderFailure::Gone),
        Some(Ok(_)) => {
            let take = match proxy::parse(&peeked).map_err(HeaderFailure::Invalid)? {
                Some((_, used)) => used,
                // All of it is header.
                None => peeked.len(),
            };
            let mut taken = BytesMut::with_capacity(take);
            match stream.recv_now(&mut taken) {
                Some(Ok(n)) if n == take => header.extend_from_slice(&taken),
                // The kernel gives back what it just showed; anything else is odd
                // enough to close on.
                Some(Ok(_)) | None => {
                    return Err(HeaderFailure::Io(io::Error::other(
                        "the socket gave back fewer bytes than it showed",
                    )));
                }
                Some(Err(e)) => return Err(HeaderFailure::Io(e)),
            }
        }
        Some(Err(e)) => return Err(HeaderFailure::Io(e)),
        None => {}
    }
    loop {
        match proxy::parse(&header).map_err(HeaderFailure::Invalid)? {
            Some((parsed, used)) if used == header.len() => return Ok(parsed),
            Some(_) => {
                return Err(HeaderFailure::Io(io::Error::other(
                    "read past the PROXY header",
                )));
            }
            None => {}
        }
        let buf = BytesMut::with_capacity(proxy::needed(&header));
        let (read, buf) = match tokio::time::timeout_at(deadline, stream.read_plain(buf)).await {
            Ok(read) => read,
            Err(_) => return Err(HeaderFailure::Timeout),
        };
        match read {
            Ok(0) if header.is_empty() => return Err(HeaderFailure::Gone),
            Ok(0) => return Err(HeaderFailure::Truncated),
            Ok(_) => header.extend_from_slice(&buf),
            Err(e) => return Err(HeaderFailure::Io(e)),
        }
    }
}

/// The client `request` comes from: what a trusted proxy's headers name, else the
/// connection's peer (after its PROXY header).
fn client_of(conn_peer: SocketAddr, request: &Request, ctx: &WorkerCtx) -> SocketAddr {
    forwarded_client(conn_peer.ip(), request, &ctx.trusted_proxies).unwrap_or(conn_peer)
}

/// A read that does not wait (`MSG_DONTWAIT`): what the socket holds now, or `None`
/// when it holds nothing yet (the caller's io_uring read waits for it).
fn read_ready(stream: &Stream, bufs: &mut ReadBufs) -> Option<ReadOutcome> {
    let mut buf = bufs.next();
    let outcome = match stream.recv_now(&mut buf)? {
        Ok(0) => ReadOutcome::Eof,
        Ok(_) => return Some(ReadOutcome::Data(buf)),
        Err(e) => ReadOutcome::Error(e),
    };
    bufs.unused(buf);
    Some(outcome)
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
    stream: &Rc<Stream>,
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
            Ok(0) => { bufs.recycle(buf, stream.as_raw_fd()); ReadOutcome::Eof }
            Ok(_) => ReadOutcome::Data(buf),
            Err(e) => ReadOutcome::Error(e),
        },
        () = sleep_until(deadline) => ReadOutcome::Timeout,
        () = shutdown, if idle => ReadOutcome::Shutdown,
    }
}

async fn write_bytes(stream: &Stream, bytes: BytesMut, metrics: &WorkerMetrics) -> io::Result<()> {
    let len = bytes.len();
    let result = stream.write_all(bytes.freeze()).await;
    metrics.bytes_out(len);
    result
}

pub(crate) async fn respond(
    stream: &Stream,
    ctx: &WorkerCtx,
    response: &Response,
    close: bool,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    response.write(&mut out, close);
    ctx.metrics.http_response(response.status);
    write_bytes(stream, out, &ctx.metrics).await
}

/// What the HTTP phase hands to the WebSocket phase.
struct Upgrade {
    bufs: ReadBufs,
    request: Request,
    accept: AcceptKey,
    /// Bytes that followed the request head (frames sent right behind it).
    rest: Bytes,
    handler: WebSocketHandler,
}

/// Serves HTTP requests until the connection ends (`Ok`) or upgrades (`Err`); the
/// first request head is due by `first_deadline`, each later one within the handshake
/// timeout of the previous answer.
async fn serve(
    stream: &Rc<Stream>,
    guard: &mut ConnGuard,
    ctx: &WorkerCtx,
    over_limit: bool,
    first_deadline: Instant,
    door: Door,
) -> Result<CloseReason, Box<Upgrade>> {
    let config = &ctx.config;
    // The connection's peer (after its PROXY header); each request's client may be
    // another when a trusted proxy forwards it.
    let conn_peer = guard.peer;
    let mut peer = conn_peer;
    let mut bufs = ReadBufs::with_first(ctx.pool.clone(), HEAD_READ);
    let mut leftover = Bytes::new();
    let mut first = true;
    loop {
        // ---- the request head, within the handshake deadline
        let deadline = if first {
            first_deadline
        } else {
            Instant::now() + config.handshake_timeout()
        };
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
                    ctx.metrics.http_response(e.status());
                    let _ = write_bytes(stream, out, &ctx.metrics).await;
                    return Ok(CloseReason::Rejected);
                }
                Ok(None) => {}
            }
            let idle = reader.buffered() == 0;
            // Accepts are deferred until the client's first bytes are in (see
            // `listener`), so the first read finds them: take them now, without an
            // io_uring read and the turn of the core it costs.
            // Not on TLS: its read answers the handshake on the way (and takes what
            // is there without waiting while the handshake runs).
            let ready = if first && idle && stream.tls().is_none() {
                read_ready(stream, &mut bufs)
            } else {
                None
            };
            let outcome = match ready {
                Some(outcome) => outcome,
                None => read_once(stream, &mut bufs, deadline, ctx, idle).await,
            };
            match outcome {
                ReadOutcome::Data(buf) => {
                    parsed = reader.handle_bytes(&buf);
                    bufs.recycle(buf, stream.as_raw_fd());
                }
                ReadOutcome::Eof if idle && !first => return Ok(CloseReason::HttpDone),
                ReadOutcome::Eof => return Ok(CloseReason::PeerGone),
                ReadOutcome::Timeout if idle && !first => return Ok(CloseReason::HttpDone),
                ReadOutcome::Timeout if stream.tls().is_some_and(|tls| tls.is_handshaking()) => {
                    if let Some(tls) = stream.tls() {
                        tls.handshake_timed_out();
                    }
                    tracing::debug!(%peer, "TLS handshake not complete within the handshake timeout");
                    return Ok(CloseReason::HandshakeTimeout);
                }
                ReadOutcome::Timeout => {
                    tracing::debug!(%peer, "request head not complete within the handshake timeout");
                    let response = Response::error(408, "request head not received in time");
                    if respond(stream, ctx, &response, true).await.is_ok() {
                        Box::pin(linger(stream, ctx)).await;
                    }
                    return Ok(CloseReason::HandshakeTimeout);
                }
                ReadOutcome::Shutdown => return Ok(CloseReason::Shutdown),
                ReadOutcome::Error(e) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    return Ok(CloseReason::IoError);
                }
            }
        };
        let first_request = first;
        first = false;
        peer = client_of(conn_peer, &request, ctx);
        guard.peer = peer;
        if over_limit && !is_probe(&request) {
            ctx.metrics.limit_hit(Limit::MaxConnections);
            tracing::warn!(%peer, limit = config.max_connections, "max_connections reached: 503");
            let response =
                Response::error(503, "server at max_connections").with_header("Retry-After", "1");
            let _ = respond(stream, ctx, &response, true).await;
            return Ok(CloseReason::Rejected);
        }
        if ctx.shutting_down.get() {
            let response = Response::error(503, "server shutting down");
            let _ = respond(stream, ctx, &response, true).await;
            return Ok(CloseReason::Shutdown);
        }
        // The per-IP limits, once per connection, on its first request's client.
        if first_request {
            match ctx.ip_limits.admit(peer.ip(), std::time::Instant::now()) {
                Ok(slot) => guard.ip_slot = slot,
                Err(refusal) => {
                    let (reason, message) = match refusal {
                        Refusal::Connections(limit) => {
                            tracing::info!(%peer, limit, "max_connections_per_ip reached: 429");
                            (
                                Rejection::ConnectionsPerIp,
                                "too many connections from this address",
                            )
                        }
                        Refusal::Handshakes(limit) => {
                            tracing::debug!(%peer, limit, "max_handshakes_per_ip_per_sec reached: 429");
                            (
                                Rejection::HandshakesPerIp,
                                "too many new connections from this address",
                            )
                        }
                    };
                    ctx.cx.metrics.rejected(reason);
                    let response = Response::error(429, message).with_header("Retry-After", "1");
                    let _ = respond(stream, ctx, &response, true).await;
                    return Ok(CloseReason::Rejected);
                }
            }
        }
        // A probe over the limit is answered, then closed.
        let mut keep = keep_alive(&request) && !over_limit;
        let route = match door_answer(door, &request, peer, ctx) {
            Some(response) => {
                // The metrics listener has nothing more to say to such a client.
                keep &= door == Door::Main;
                Route::Respond(response)
            }
            None => ctx.service.route(&request, peer, &ctx.cx),
        };
        match route {
            Route::Respond(response) => {
                // A body we did not read would be taken for the next request: close.
                let close = !keep || body_framing(&request, 0) != Ok(BodyFraming::None);
                ctx.metrics.http_request();
                if respond(stream, ctx, &response, close).await.is_err() {
                    return Ok(CloseReason::IoError);
                }
                if close {
                    return Ok(if response.status >= 400 {
                        CloseReason::Rejected
                    } else {
                        CloseReason::HttpDone
                    });
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
                        return Ok(CloseReason::Rejected);
                    }
                };
                let (body, after) = match read_body(stream, &mut bufs, rest, framing, ctx).await {
                    Ok(read) => read,
                    Err(reason) => return Ok(reason),
                };
                ctx.metrics.http_request();
                let tasks = BackgroundTasks::deferred(ctx.cx.tasks.clone());
                let mut future = tasks.scope(|| {
                    handler(HttpRequest {
                        head: request,
                        body,
                        peer,
                        tasks: tasks.clone(),
                    })
                });
                let mut response =
                    poll_fn(|cx| match tasks.scope(|| poll_handler(&mut future, cx)) {
                        Polled::Ready(response) => Poll::Ready(response),
                        Polled::Pending => Poll::Pending,
                        Polled::Panicked(message) => {
                            tracing::error!(%peer, panic = %message, "HTTP handler panicked: 500");
                            ctx.metrics.handler_panicked(HandlerKind::Http);
                            tasks.discard("the HTTP handler panicked");
                            Poll::Ready(Response::error(500, "internal server error"))
                        }
                    })
                    .await;
                drop(future);
                // Every durable job of the request is in Redis (or refused) before the
                // response says anything.
                tasks.settle().await;
                if let Some(refusal) = tasks.refusal() {
                    tasks.discard(&format!(
                        "{}: the request was answered {}",
                        refusal.reason, refusal.status
                    ));
                    response = Response::error(refusal.status, &refusal.reason);
                    if refusal.status == 503 {
                        response = response.with_header("Retry-After", "1");
                    }
                }
                let written = respond(stream, ctx, &response, !keep).await;
                // The response is on the socket: the request's jobs may start now (and
                // still do when the write failed; the handler committed to them).
                tasks.commit();
                if written.is_err() {
                    return Ok(CloseReason::IoError);
                }
                if !keep {
                    return Ok(CloseReason::HttpDone);
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
                        ctx.metrics.http_response(e.status());
                        let _ = write_bytes(stream, out, &ctx.metrics).await;
                        return Ok(CloseReason::Rejected);
                    }
                };
                return Err(Box::new(Upgrade {
                    bufs,
                    request,
                    accept,
                    rest,
                    handler,
                }));
            }
        }
    }
}

/// `GET /metrics` or `GET /healthz`, not an upgrade: what the metrics listener serves.
fn is_probe(request: &Request) -> bool {
    request.method() == "GET"
        && matches!(request.path(), "/metrics" | "/healthz")
        && !request.is_upgrade()
}

/// What a listener answers itself, before the service sees the request: the metrics
/// listener (`metrics_bind`) serves only `GET /metrics` and `GET /healthz` (404 and
/// close for anything else, upgrades included); when it is set, the main listeners answer
/// `GET /metrics` with 404 (their `/healthz` stays, for load balancers).
fn door_answer(
    door: Door,
    request: &Request,
    peer: SocketAddr,
    ctx: &WorkerCtx,
) -> Option<Response> {
    match door {
        Door::Metrics if is_probe(request) => None,
        Door::Metrics => {
            tracing::debug!(%peer, method = request.method(), path = request.path(), "not served on the metrics listener: 404");
            Some(Response::error(
                404,
                "the metrics listener serves only GET /metrics and GET /healthz",
            ))
        }
        Door::Main
            if ctx.metrics_elsewhere
                && request.method() == "GET"
                && request.path() == "/metrics" =>
        {
            tracing::debug!(%peer, "GET /metrics on a main listener while metrics_bind is set: 404");
            Some(Response::error(
                404,
                "metrics are served on the metrics listener",
            ))
        }
        Door::Main => None,
    }
}

/// Reads a `Content-Length` body, starting with the bytes that followed the head.
async fn read_body(
    stream: &Rc<Stream>,
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
                bufs.recycle(buf, stream.as_raw_fd());
            }
            ReadOutcome::Timeout => {
                let response = Response::error(408, "request body not received in time");
                if respond(stream, ctx, &response, true).await.is_ok() {
                    Box::pin(linger(stream, ctx)).await;
                }
                return Err(CloseReason::HandshakeTimeout);
            }
            ReadOutcome::Eof | ReadOutcome::Shutdown => return Err(CloseReason::PeerGone),
            ReadOutcome::Error(_) => return Err(CloseReason::IoError),
        }
    }
    let after = body.split_off(len).freeze();
    Ok((body.freeze(), after))
}

/// Polls the handler until it accepts or rejects, within the handshake deadline.
/// Returns the 101 response to send, or how the connection ended.
async fn decide(
    stream: &Rc<Stream>,
    session: &Session,
    handler: &mut Option<LocalFuture<()>>,
    accept: &AcceptKey,
    extension: Option<&str>,
    ctx: &WorkerCtx,
) -> Result<Bytes, CloseReason> {
    let deadline = Instant::now() + ctx.config.handshake_timeout();
    let decided = tokio::time::timeout_at(
        deadline,
        poll_fn(|cx| {
            if let Some(h) = handler.as_mut() {
                match poll_handler(h, cx) {
                    Polled::Ready(()) => *handler = None,
                    Polled::Pending => {}
                    Polled::Panicked(message) => {
                        tracing::error!(peer = %session.peer(), panic = %message, "WebSocket handler panicked before accepting: 500");
                        ctx.metrics.handler_panicked(HandlerKind::WebSocket);
                        *handler = None;
                        return Poll::Ready(Err(Response::error(500, "internal server error")));
                    }
                }
            }
            let mut state = session.state().borrow_mut();
            match std::mem::replace(&mut state.decision, Decision::Pending) {
                Decision::Pending if handler.is_none() => {
                    tracing::warn!(
                        peer = %session.peer(),
                        path = session.request().path(),
                        "WebSocket handler returned without calling accept() or reject(): 403"
                    );
                    Poll::Ready(Err(Response::error(
                        403,
                        "the WebSocket handler did not accept the connection",
                    )))
                }
                Decision::Pending => {
                    state.driver_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                Decision::Accept(protocol) => {
                    state.decision = Decision::Accept(protocol.clone());
                    Poll::Ready(Ok(protocol))
                }
                Decision::Reject(response) => Poll::Ready(Err(*response)),
            }
        }),
    )
    .await;
    let response = match decided {
        Ok(Ok(protocol)) => {
            let mut head = BytesMut::new();
            let extensions = extension.map(|value| ("Sec-WebSocket-Extensions", value));
            handshake::write_accept(
                &mut head,
                accept,
                protocol.as_deref().map(String::as_str),
                extensions.as_slice(),
            );
            ctx.metrics.upgraded();
            ctx.metrics.http_response(101);
            return Ok(head.freeze());
        }
        Ok(Err(response)) => response,
        Err(_) => {
            tracing::warn!(peer = %session.peer(), "WebSocket handler did not accept or reject within the handshake timeout");
            Response::error(503, "handler did not decide in time")
        }
    };
    let _ = respond(stream, ctx, &response, true).await;
    Err(CloseReason::Rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::HandshakeLimits;
    use crate::proto::handshake::parse_request;

    fn head(text: &str) -> Request {
        parse_request(text.as_bytes(), &HandshakeLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    /// What the metrics listener serves and a full server still answers: the two
    /// built-in GETs, not their upgrades, other methods or other paths.
    #[test]
    fn probes_are_the_gets_of_metrics_and_healthz() {
        assert!(is_probe(&head("GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n")));
        assert!(is_probe(&head(
            "GET /healthz?x=1 HTTP/1.1\r\nHost: h\r\n\r\n"
        )));
        assert!(!is_probe(&head(
            "POST /metrics HTTP/1.1\r\nHost: h\r\n\r\n"
        )));
        assert!(!is_probe(&head(
            "GET /metricsx HTTP/1.1\r\nHost: h\r\n\r\n"
        )));
        assert!(!is_probe(&head("GET / HTTP/1.1\r\nHost: h\r\n\r\n")));
        assert!(!is_probe(&head(
            "GET /healthz HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )));
    }
}
