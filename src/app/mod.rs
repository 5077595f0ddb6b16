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

pub mod access;
pub mod rooms;
mod router;
pub mod v1;
mod websocket;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::SystemTime;

use bytes::Bytes;

pub use access::{AuthRequest, Grant, TopicRules};
pub use router::{PARAM_TYPES, ParamError, RouteError};
pub use websocket::WebSocket;

use crate::config::Config;
use crate::metrics::{self, Metrics, Rejection};
use crate::proto::CloseCode;
use crate::proto::handshake::Request as Head;
use crate::pubsub::{Hub, Publisher};
use crate::runtime::{Context, HttpRequest, LocalFuture, Response, Route, Service, Session};
use crate::tasks::jobs::{Job, JobRegistry};
use crate::tasks::{BackgroundTasks, QueueFullPolicy};
use access::Access;
use router::{Match, Pattern};

type WsFn = Arc<dyn Fn(WebSocket) -> LocalFuture<()> + Send + Sync>;
type HttpFn = Arc<dyn Fn(Request) -> LocalFuture<Response> + Send + Sync>;
type AuthFn = Arc<dyn Fn(AuthRequest) -> LocalFuture<Result<Grant, Response>> + Send + Sync>;

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
    /// The app's own connect hook ([`App::authorize`]).
    authorize: Option<AuthFn>,
    /// The access rules, from the configuration of the server that runs the app.
    access: Arc<OnceLock<Arc<Access>>>,
    /// Whether the app serves the publish API (the default app), for the startup log.
    publish_api: bool,
    /// Durable jobs ([`App::job`]).
    jobs: JobRegistry,
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
            .field("jobs", &self.jobs)
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
        if let Some(e) = self.errors.first() {
            return Err(e.clone());
        }
        self.jobs.check().map_err(|reason| RouteError {
            pattern: String::new(),
            reason,
        })
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

    /// A durable background job: `handler` runs each job `name` enqueued with
    /// [`BackgroundTasks::enqueue`] (by this process or any other with the same app),
    /// on an executor thread, at least once. An `Err` (its `Display` is recorded) or a
    /// panic is retried with backoff, up to `job_max_attempts` runs, then the job goes
    /// to the dead-letter stream. Needs `jobs_redis_url` or `redis_url`; see
    /// [`crate::tasks::jobs`]. A bad name (1 to 128 of `A-Z a-z 0-9 _ . : -`) or a
    /// repeated one is an error of [`App::check`].
    pub fn job<F, Fut, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.jobs.register(name, handler);
        self
    }

    /// What an HTTP request gets when its handler's background job finds the queue
    /// full. Default [`QueueFullPolicy::Reject503`].
    pub fn queue_full_policy(mut self, policy: QueueFullPolicy) -> Self {
        self.queue_full = policy;
        self
    }

    /// A connect hook, for teams whose users log in with cookie sessions: every
    /// WebSocket handshake that passed the origin and JWT checks waits for it (on its
    /// own core, within the handshake timeout, without holding the core) before the
    /// handler runs. `Ok(grant)` admits, with what the client may subscribe and
    /// publish to (every topic must be allowed by the JWT's grant too, when JWTs are
    /// configured); `Err(response)` refuses, with that response. `ringsocket serve`
    /// has the same with `auth_url`.
    ///
    /// ```no_run
    /// use ringsocket::app::{App, Grant};
    /// use ringsocket::runtime::Response;
    ///
    /// let app = App::standard().authorize(|req| async move {
    ///     match req.request().header_str("cookie") {
    ///         Some(c) if c.contains("session=") => Ok(Grant::new("user-1").topics(["lobby"])),
    ///         _ => Err(Response::error(401, "log in first")),
    ///     }
    /// });
    /// ```
    pub fn authorize<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(AuthRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Grant, Response>> + 'static,
    {
        self.authorize = Some(Arc::new(move |req| Box::pin(hook(req))));
        self
    }

    /// The access rules in force (the defaults until a server configures the app).
    fn access(&self) -> Arc<Access> {
        self.access
            .get_or_init(|| Arc::new(Access::default()))
            .clone()
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

impl App {
    /// A handshake for a WebSocket route: the origin and the JWT now, then the
    /// connect hooks and the handler in the connection's task.
    fn websocket_route(
        &self,
        head: &Head,
        peer: SocketAddr,
        cx: &Context,
        handler: WsFn,
        params: Vec<(String, String)>,
    ) -> Route {
        let access = self.access();
        if let Err(refused) = access.check_origin(head, peer) {
            return Route::Respond(refused);
        }
        let jwt = match access.check_jwt(head, peer) {
            Ok(jwt) => jwt,
            Err(refused) => return Route::Respond(refused),
        };
        let tasks = cx.tasks.clone();
        let authorize = self.authorize.clone();
        // No rule that needs the connection's task: the handler runs as it always did.
        if jwt.is_none() && authorize.is_none() && access.hook().is_none() {
            return Route::WebSocket(Box::new(move |session: Session| {
                let tasks = BackgroundTasks::immediate(tasks);
                handler(WebSocket::new(session, params, tasks, access, None))
            }));
        }
        Route::WebSocket(Box::new(move |session: Session| {
            Box::pin(async move {
                let tasks = BackgroundTasks::immediate(tasks);
                let grants = match admit(&access, authorize, &session, jwt).await {
                    Ok(grants) => grants,
                    Err(refused) => {
                        access.rejected(Rejection::AuthHook);
                        session.reject(refused);
                        return;
                    }
                };
                let expires = grants.iter().filter_map(|g| g.expires_at).min();
                if let Some(sub) = grants.iter().find_map(|g| g.sub.as_deref()) {
                    tracing::debug!(peer = %session.peer(), sub, path = session.request().path(), "client admitted");
                }
                let ws = WebSocket::new(
                    session.clone(),
                    params,
                    tasks,
                    access.clone(),
                    Some(grants.into()),
                );
                match expires {
                    None => handler(ws).await,
                    Some(at) => run_until_expiry(handler(ws), &session, at, &access).await,
                }
            })
        }))
    }
}

/// Runs the connect hooks (`auth_url`, then the app's), collecting the grants every
/// topic must be allowed by.
async fn admit(
    access: &Access,
    authorize: Option<AuthFn>,
    session: &Session,
    jwt: Option<Grant>,
) -> Result<Vec<Grant>, Response> {
    let mut grants = Vec::with_capacity(2);
    if let Some(client) = access.hook() {
        grants.push(client.ask(session.request(), session.peer()).await?);
    }
    if let Some(hook) = authorize {
        let grant = hook(AuthRequest::new(session.clone(), jwt.clone())).await?;
        grants.push(grant);
    }
    grants.extend(jwt);
    Ok(grants)
}

/// Runs the handler; when `at` passes, closes the connection with 1008 "token
/// expired" (the handler then sees the close as for any other).
async fn run_until_expiry(
    handler: LocalFuture<()>,
    session: &Session,
    at: SystemTime,
    access: &Access,
) {
    // Already past (it expired while a hook decided): refused before the handler runs.
    let (left, past) = match at.duration_since(SystemTime::now()) {
        Ok(left) => (left, false),
        Err(_) => (std::time::Duration::ZERO, true),
    };
    let mut expiry = pin!(tokio::time::sleep(left));
    let mut handler = handler;
    let mut expired = false;
    std::future::poll_fn(|cx| {
        if !expired && (past || expiry.as_mut().poll(cx).is_ready()) {
            expired = true;
            access.rejected(Rejection::TokenExpired);
            if session.is_accepted() {
                tracing::debug!(peer = %session.peer(), "token expired: close 1008");
                session.close(CloseCode::Policy, "token expired");
            } else {
                // It expired while the handler had not decided yet.
                tracing::debug!(peer = %session.peer(), "token expired before the upgrade: 401");
                session.reject(
                    Response::error(401, "invalid token: expired")
                        .with_header("WWW-Authenticate", "Bearer"),
                );
                // The handler never runs: the refusal is the answer.
                return Poll::Ready(());
            }
        }
        handler.as_mut().poll(cx)
    })
    .await;
}

impl Service for App {
    fn configure(&self, config: &Config, metrics: &Metrics) -> Result<(), String> {
        let access = Access::from_config(config, metrics.rejections().clone())?;
        if let Some(algorithm) = access.jwt_algorithm() {
            tracing::debug!("WebSocket handshakes need a JWT signed with {algorithm:?}");
        }
        if self.publish_api {
            if access.publish_closed() {
                tracing::warn!("{}", access.publish_summary());
            } else {
                tracing::debug!("{}", access.publish_summary());
            }
        }
        self.access.set(Arc::new(access)).map_err(|_| {
            "this App is already configured by a server; build a new App for another server"
                .to_owned()
        })
    }

    fn bind_workers(&self, workers: usize) -> Result<(), String> {
        self.check().map_err(|e| e.to_string())?;
        self.hub.bind(workers)
    }

    fn durable_jobs(&self) -> JobRegistry {
        self.jobs.clone()
    }

    fn worker_started(&self, worker: usize, cx: &Context) -> Option<LocalFuture<()>> {
        self.hub.set_metrics_topics(cx.config.metrics_topics);
        self.hub.set_history(crate::pubsub::HistorySettings {
            size: cx.config.history_size,
            ttl: std::time::Duration::from_secs(cx.config.history_ttl_secs),
            memory_limit: cx.config.history_memory_limit,
        });
        self.hub.core_task(worker, cx.config.max_outbound_bytes)
    }

    fn route(&self, head: &Head, peer: SocketAddr, cx: &Context) -> Route {
        let path = head.path();
        if self.builtins && head.method() == "GET" {
            match path {
                "/healthz" => return Route::Respond(Response::text(200, "ok\n")),
                "/metrics" => {
                    if let Err(refused) = self.access().check_metrics(head, peer) {
                        return Route::Respond(refused);
                    }
                    return Route::Respond(self.scrape(cx));
                }
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
                        return self.websocket_route(head, peer, cx, handler.clone(), params);
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
