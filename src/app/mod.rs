//! The application layer, FastAPI-like: routes with path parameters for WebSocket and
//! HTTP, the WebSocket handle, and the built-in `/healthz` and `/metrics`.
//!
//! ```no_run
//! use ringsocket::app::App;
//! use ringsocket::runtime::Response;
//!
//! let app = App::new()
//!     .websocket("/ws/{client_id:u64}", |ws| async move {
//!         let id: u64 = ws.param("client_id").unwrap_or_default();
//!         ws.accept();
//!         while let Ok(message) = ws.recv().await {
//!             if ws.send(message).is_err() {
//!                 break;
//!             }
//!         }
//!         let _ = id;
//!     })
//!     .get("/hello/{name}", |req| async move {
//!         Response::text(200, format!("hello {}", req.param::<String>("name").unwrap_or_default()))
//!     });
//! ```

pub mod rooms;
mod router;
mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

pub use router::{PARAM_TYPES, ParamError, RouteError};
pub use websocket::WebSocket;

use crate::metrics;
use crate::proto::handshake::Request as Head;
use crate::pubsub::{Hub, Publisher};
use crate::runtime::{Context, HttpRequest, LocalFuture, Response, Route, Service, Session};
use crate::tasks::{BackgroundTasks, QueueFullPolicy};
use router::{Match, Pattern};

type WsFn = Arc<dyn Fn(WebSocket) -> LocalFuture<()> + Send + Sync>;
type HttpFn = Arc<dyn Fn(Request) -> LocalFuture<Response> + Send + Sync>;

/// An HTTP request as a handler sees it.
#[derive(Debug)]
pub struct Request {
    inner: HttpRequest,
    params: Vec<(String, String)>,
}

impl Request {
    /// The request head: method, path, query, headers.
    pub fn head(&self) -> &Head {
        &self.inner.head
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.inner.body
    }

    /// The client's address: the TCP peer, or the source of its PROXY protocol header
    /// (`proxy_protocol`), or what a trusted proxy's `Forwarded` / `X-Forwarded-For`
    /// names (`trusted_proxies`; port 0 when the header gives none).
    pub fn peer(&self) -> SocketAddr {
        self.inner.peer
    }

    /// The request's background jobs: they start once the response has been written.
    pub fn tasks(&self) -> &BackgroundTasks {
        &self.inner.tasks
    }

    /// The path parameter `name`, converted to `T`.
    pub fn param<T: FromStr>(&self, name: &str) -> Option<T> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.parse().ok())
    }
}

/// The HTTP methods an [`App`] routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// GET (and HEAD is not routed).
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// DELETE.
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
        }
    }
}

/// Routes, built once and shared by every worker.
#[derive(Clone, Default)]
pub struct App {
    websockets: Vec<(Pattern, WsFn)>,
    http: Vec<(Method, Pattern, HttpFn)>,
    builtins: bool,
    /// Rooms: shared by the app's clones and its publishers.
    hub: Arc<Hub>,
    queue_full: QueueFullPolicy,
    /// Patterns that did not compile; [`App::check`] and the server's start report
    /// them.
    errors: Vec<RouteError>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field(
                "websockets",
                &self
                    .websockets
                    .iter()
                    .map(|(p, _)| p.source())
                    .collect::<Vec<_>>(),
            )
            .field(
                "http",
                &self
                    .http
                    .iter()
                    .map(|(m, p, _)| (m.as_str(), p.source()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl App {
    /// An app with the built-in `GET /healthz` and `GET /metrics`.
    pub fn new() -> Self {
        Self {
            builtins: true,
            ..Self::default()
        }
    }

    /// An app without the built-in routes.
    pub fn bare() -> Self {
        Self::default()
    }

    /// A WebSocket route. The handler must [`accept`](WebSocket::accept) (or
    /// [`reject`](WebSocket::reject)) the connection before it can `recv`; one that
    /// returns without deciding gets 403, logged at WARN.
    ///
    /// `pattern` is a path of literal segments and parameters, each a whole segment:
    /// `{name}` matches any non-empty segment (percent-decoded), `{name:type}` only one
    /// that parses as `type`, one of [`PARAM_TYPES`]: `str`, `u64`, `i64`, `u32`,
    /// `i32`, `f64` (finite), `bool`. A path whose typed parameter does not parse is
    /// answered 400 before the handler runs. Read parameters with
    /// [`WebSocket::param`].
    ///
    /// A pattern that does not compile (an unknown type such as `{id:usize}`, a
    /// missing leading `/`) is not added: [`App::check`] returns the error, and
    /// [`Server::start`](crate::runtime::Server::start) refuses to start with it.
    pub fn websocket<F, Fut>(mut self, pattern: &str, handler: F) -> Self
    where
        F: Fn(WebSocket) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        match Pattern::parse(pattern) {
            Ok(pattern) => self
                .websockets
                .push((pattern, Arc::new(move |ws| Box::pin(handler(ws))))),
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// The first route pattern that did not compile, if any (see
    /// [`App::websocket`]). The server checks this when it starts.
    pub fn check(&self) -> Result<(), RouteError> {
        match self.errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// An HTTP route for `method`. `pattern` is written as for [`App::websocket`];
    /// read parameters with [`Request::param`].
    pub fn route<F, Fut>(mut self, method: Method, pattern: &str, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + 'static,
    {
        match Pattern::parse(pattern) {
            Ok(pattern) => {
                self.http
                    .push((method, pattern, Arc::new(move |req| Box::pin(handler(req)))))
            }
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// A GET route.
    pub fn get<F, Fut>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + 'static,
    {
        self.route(Method::Get, pattern, handler)
    }

    /// A POST route.
    pub fn post<F, Fut>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response> + 'static,
    {
        self.route(Method::Post, pattern, handler)
    }

    /// What an HTTP request gets when its handler's background job finds the queue
    /// full. Default [`QueueFullPolicy::Reject503`].
    pub fn queue_full_policy(mut self, policy: QueueFullPolicy) -> Self {
        self.queue_full = policy;
        self
    }

    /// An app with `/echo`, which sends every message back.
    pub fn echo() -> Self {
        Self::new().websocket("/echo", echo)
    }

    /// A handle to publish to this app's rooms from anywhere (HTTP handlers,
    /// background jobs, other threads). Publishing works once the server runs.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.hub.clone())
    }

    /// The app's rooms: subscriber counts, broker, metrics.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Makes topics matching `pattern` conflated with `window` (see
    /// [`crate::pubsub`]): an exact name, or a prefix followed by `*`.
    pub fn conflate(self, pattern: &str, window: std::time::Duration) -> Self {
        self.hub.conflate(pattern, window);
        self
    }
}

/// Echoes every message until the peer closes.
pub async fn echo(ws: WebSocket) {
    ws.accept();
    while let Ok(message) = ws.recv().await {
        if ws.send(message).is_err() {
            break;
        }
    }
}

impl App {
    /// The `/metrics` page: the process's, the workers', the executor's and the hub's
    /// (with its broker's) metrics, in the OpenMetrics text format.
    fn scrape(&self, cx: &Context) -> Response {
        let mut registry = cx.metrics.registry();
        let ours = registry.sub_registry_with_prefix(metrics::PREFIX);
        ours.register_collector(Box::new(cx.tasks.clone()));
        ours.register_collector(Box::new(self.hub.clone()));
        match metrics::encode(&registry) {
            Ok(body) => Response {
                content_type: metrics::CONTENT_TYPE.into(),
                ..Response::text(200, body)
            },
            Err(e) => {
                tracing::error!(error = %e, "encoding the metrics failed");
                Response::error(500, "the metrics could not be encoded")
            }
        }
    }
}

impl Service for App {
    fn bind_workers(&self, workers: usize) -> Result<(), String> {
        self.check().map_err(|e| e.to_string())?;
        self.hub.bind(workers)
    }

    fn worker_started(&self, worker: usize, cx: &Context) -> Option<LocalFuture<()>> {
        self.hub.core_task(worker, cx.config.max_outbound_bytes)
    }

    fn route(&self, head: &Head, _peer: SocketAddr, cx: &Context) -> Route {
        let path = head.path();
        if self.builtins && head.method() == "GET" {
            match path {
                "/healthz" => return Route::Respond(Response::text(200, "ok\n")),
                "/metrics" => return Route::Respond(self.scrape(cx)),
                _ => {}
            }
        }
        if head.is_upgrade()
            || self
                .http
                .iter()
                .all(|(_, p, _)| p.matches(path) == Match::No)
        {
            for (pattern, handler) in &self.websockets {
                match pattern.matches(path) {
                    Match::Yes(params) => {
                        let handler = handler.clone();
                        let tasks = cx.tasks.clone();
                        return Route::WebSocket(Box::new(move |session: Session| {
                            let tasks = BackgroundTasks::immediate(tasks);
                            handler(WebSocket::new(session, params, tasks))
                        }));
                    }
                    Match::BadParam(e) => {
                        return Route::Respond(Response::error(400, &e.to_string()));
                    }
                    Match::No => {}
                }
            }
        }
        let mut allowed = Vec::new();
        for (method, pattern, handler) in &self.http {
            match pattern.matches(path) {
                Match::Yes(params) if method.as_str() == head.method() => {
                    let handler = handler.clone();
                    let policy = self.queue_full;
                    return Route::Http(Box::new(move |inner: HttpRequest| {
                        inner.tasks.set_policy(policy);
                        handler(Request { inner, params })
                    }));
                }
                Match::BadParam(e) if method.as_str() == head.method() => {
                    return Route::Respond(Response::error(400, &e.to_string()));
                }
                Match::Yes(_) | Match::BadParam(_) => allowed.push(method.as_str()),
                Match::No => {}
            }
        }
        if !allowed.is_empty() {
            return Route::Respond(
                Response::error(405, &format!("method {} not allowed", head.method()))
                    .with_header("Allow", allowed.join(", ")),
            );
        }
        Route::Respond(Response::error(404, &format!("no route for {path}")))
    }
}
