//! The narrow interface between the runtime and the layers above it.
//!
//! The runtime parses a request head and asks the [`Service`] what to do with it; the
//! answer is a response, an HTTP handler, or a WebSocket handler that receives a
//! [`Session`]. Handler futures run on the core that owns the
//! connection and need not be `Send`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use super::http::Response;
use super::session::Session;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proto::handshake::Request;
use crate::tasks::jobs::JobRegistry;
use crate::tasks::{BackgroundTasks, TaskHandle};

/// A future that runs on the worker's thread.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T> + 'static>>;

/// Handles an HTTP request once its body has been read.
pub type HttpHandler = Box<dyn FnOnce(HttpRequest) -> LocalFuture<Response>>;

/// Runs a WebSocket connection. It must call [`Session::accept`] or
/// [`Session::reject`]; returning without either refuses the handshake with 403.
pub type WebSocketHandler = Box<dyn FnOnce(Session) -> LocalFuture<()>>;

/// What to do with a request head.
#[non_exhaustive]
pub enum Route {
    /// Answer at once, without reading a body (404, 405, 400…).
    Respond(Response),
    /// Read the body, then run the handler.
    Http(HttpHandler),
    /// Check the upgrade (RFC 6455 §4.2.1), then run the handler.
    WebSocket(WebSocketHandler),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Respond(response) => f.debug_tuple("Respond").field(&response.status).finish(),
            Self::Http(_) => f.write_str("Http(..)"),
            Self::WebSocket(_) => f.write_str("WebSocket(..)"),
        }
    }
}

/// A complete HTTP request.
#[derive(Debug)]
pub struct HttpRequest {
    /// The request head.
    pub head: Request,
    /// The body (`Content-Length` bytes).
    pub body: Bytes,
    /// The client's address: the TCP peer, or the source of its PROXY protocol header
    /// (`proxy_protocol`), or what a trusted proxy's `Forwarded` / `X-Forwarded-For`
    /// names (`trusted_proxies`; port 0 when the header gives none).
    pub peer: SocketAddr,
    /// The request's background jobs, handed to the executor after the response.
    pub tasks: BackgroundTasks,
}

/// What a service may consult while routing.
#[derive(Debug, Clone)]
pub struct Context {
    /// The server's configuration.
    pub config: Arc<Config>,
    /// Every worker's counters.
    pub metrics: Metrics,
    /// Queues background jobs on the executor threads.
    pub tasks: TaskHandle,
}

/// Routes request heads. One instance serves every worker; the handlers it returns run
/// on the worker that owns the connection.
pub trait Service: Send + Sync + 'static {
    /// Decides what to do with `head`, received from `peer` (the client's address, as
    /// [`Session::peer`] gives it).
    fn route(&self, head: &Request, peer: SocketAddr, cx: &Context) -> Route;

    /// Called once by the server with its validated configuration and counters, once
    /// its listeners are bound and before any worker starts: the service reads the
    /// settings it enforces (keys, token files) here. An error (a key file that cannot be read, say) stops the
    /// start with that message.
    fn configure(&self, config: &Config, metrics: &Metrics) -> Result<(), String> {
        let _ = (config, metrics);
        Ok(())
    }

    /// Called once by the server before its `workers` threads start. An error (e.g. the
    /// service is already bound to another running server) stops the start.
    fn bind_workers(&self, workers: usize) -> Result<(), String> {
        let _ = workers;
        Ok(())
    }

    /// The durable jobs this service runs (see [`crate::tasks::jobs`]). When any is
    /// registered the server starts the job queue on `jobs_redis_url` (or
    /// `redis_url`), and refuses to start without one. Default: none.
    fn durable_jobs(&self) -> JobRegistry {
        JobRegistry::default()
    }

    /// Called on each worker's thread as it starts, before it accepts. The returned
    /// task, if any, runs on that core for the worker's whole life (e.g. the core's
    /// pubsub inbox). It is dropped when the worker stops.
    fn worker_started(&self, worker: usize, cx: &Context) -> Option<LocalFuture<()>> {
        let _ = (worker, cx);
        None
    }
}

/// How polling a handler went.
pub(crate) enum Polled<T> {
    Ready(T),
    Pending,
    /// The handler panicked; the message, when it was a string.
    Panicked(String),
}

/// Polls a handler's future, catching a panic so that it ends only its own request or
/// connection (500 or Close 1011), never the worker.
pub(crate) fn poll_handler<T>(
    future: &mut LocalFuture<T>,
    cx: &mut std::task::Context<'_>,
) -> Polled<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
        Ok(std::task::Poll::Ready(value)) => Polled::Ready(value),
        Ok(std::task::Poll::Pending) => Polled::Pending,
        Err(payload) => Polled::Panicked(crate::tasks::panic_message(&*payload)),
    }
}
