//! The runtime: thread-per-core workers (a tokio current-thread runtime and an io_uring
//! of their own each), `SO_REUSEPORT` listeners, the connection driver, timers and
//! graceful shutdown.
//!
//! Everything that touches io_uring stays in this module (its driver is `uring`),
//! behind [`Service`] and [`Session`], so that the I/O driver can change without
//! touching `proto` or `app`.
//!
//! Threading model: N workers, each an OS thread pinned to a core with its own runtime
//! and listener. A connection lives on the core that accepted it; nothing is locked per
//! message. Workers share only the configuration, the service, their counters (each
//! written by one worker) and the shutdown signal.

mod buf;
mod client_addr;
mod compression;
mod conn;
mod core;
mod ctx;
mod epoll;
mod feed;
mod flush;
pub mod http;
mod inbound;
mod ip_limits;
pub mod listener;
mod registry;
pub mod service;
mod session;
pub mod shutdown;
pub mod tls;
mod uring;
mod worker;
mod ws;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Duration;

pub(crate) use feed::{Feed, unfollow};
pub use http::Response;
pub use service::{
    Context, HttpHandler, HttpRequest, LocalFuture, Route, Service, WebSocketHandler,
};
pub use session::{Disconnect, Session};
pub use shutdown::ShutdownSignal;

use crate::config::{Config, IoBackend};
use crate::metrics::Metrics;
use crate::tasks::jobs::{DurableJobs, JobSettings};
use crate::tasks::{Executor, TaskHandle};

/// The I/O backend the workers run on, once chosen (see [`choose_backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// io_uring, through the runtime's own driver (`uring`).
    IoUring,
    /// epoll, through tokio's reactor.
    Epoll,
}

impl Backend {
    /// Its name, as the startup line and `/metrics` (`ringsocket_info{io_backend=…}`)
    /// give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

/// The backend the `io_backend` setting asks for: `auto` is io_uring when this process
/// can set up a ring and epoll otherwise, with one WARN naming the cause and how to
/// allow io_uring; `io_uring` is an error when it is not available.
pub fn choose_backend(setting: IoBackend) -> Result<Backend, ServeError> {
    match setting {
        IoBackend::Epoll => Ok(Backend::Epoll),
        IoBackend::IoUring => probe_io_uring().map(|()| Backend::IoUring),
        IoBackend::Auto => match probe_io_uring() {
            Ok(()) => Ok(Backend::IoUring),
            Err(ServeError::IoUring(why)) => {
                tracing::warn!(
                    "io_uring is not available ({why}); running on the epoll backend \
                     (io_backend = \"epoll\" says so without this warning, \
                     io_backend = \"io_uring\" refuses to start without io_uring)"
                );
                Ok(Backend::Epoll)
            }
            Err(e) => Err(e),
        },
    }
}

/// Why the server could not start or run.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// io_uring is not available; the text says why and what to change.
    IoUring(String),
    /// The address could not be bound.
    Bind(SocketAddr, io::Error),
    /// Another process (or another socket of this one) already listens on the address:
    /// the server does not share it (`SO_REUSEPORT` would split the connections).
    AddrInUse(SocketAddr),
    /// The configuration is invalid.
    Config(String),
    /// A worker thread could not be started or died.
    Worker(String),
    /// The TLS certificate or key could not be loaded; the text names the file and
    /// the cause.
    Tls(String),
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IoUring(why) => write!(f, "io_uring is not available: {why}"),
            Self::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            Self::AddrInUse(addr) => write!(
                f,
                "cannot listen on {addr}: another process is already listening on it \
                 (stop it or choose another address)"
            ),
            Self::Config(why) => write!(f, "invalid configuration: {why}"),
            Self::Worker(why) => write!(f, "worker failed: {why}"),
            Self::Tls(why) => write!(f, "TLS: {why}"),
        }
    }
}

impl std::error::Error for ServeError {}

impl ServeError {
    /// The error of binding `addr`: [`ServeError::AddrInUse`] when it is taken.
    fn bind(addr: SocketAddr, e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::AddrInUse {
            Self::AddrInUse(addr)
        } else {
            Self::Bind(addr, e)
        }
    }
}

/// Starts the durable job queue when `service` registers jobs, and attaches it to the
/// executor's handles.
fn start_jobs(
    config: &Config,
    service: &dyn Service,
    executor: &Executor,
) -> Result<Option<DurableJobs>, ServeError> {
    let registry = service.durable_jobs();
    if registry.is_empty() {
        return Ok(None);
    }
    let settings = JobSettings::from_config(config).map_err(ServeError::Config)?;
    let Some(settings) = settings else {
        let names: Vec<&str> = registry.names().collect();
        return Err(ServeError::Config(format!(
            "the app registers durable jobs ({}) but no Redis is configured: set \
             jobs_redis_url or redis_url",
            names.join(", ")
        )));
    };
    let jobs = DurableJobs::start(settings, registry, executor.handle())
        .map_err(|e| ServeError::Config(format!("durable jobs: {e}")))?;
    executor.handle().attach_jobs(jobs.queue());
    Ok(Some(jobs))
}

/// Checks that this process can create an io_uring instance, and explains why not.
pub fn probe_io_uring() -> Result<(), ServeError> {
    match io_uring::IoUring::new(8) {
        Ok(_) => Ok(()),
        Err(e) => Err(ServeError::IoUring(explain_io_uring_error(&e))),
    }
}

fn explain_io_uring_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            format!("{e}: the kernel has no io_uring (Linux 5.11 or later is needed)")
        }
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{e}: io_uring is disabled for this process; set sysctl kernel.io_uring_disabled=0, \
             or allow io_uring_setup/io_uring_enter/io_uring_register in the container's seccomp profile"
        ),
        Some(libc::ENOMEM) => {
            format!("{e}: not enough locked memory; raise RLIMIT_MEMLOCK (ulimit -l)")
        }
        _ => e.to_string(),
    }
}

/// Starts servers.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Binds, starts the workers and returns at once. The server runs until
    /// [`RunningServer::shutdown`] (or its drop).
    pub fn start(config: Config, service: Arc<dyn Service>) -> Result<RunningServer, ServeError> {
        config.validate().map_err(|e| ServeError::Config(e.0))?;
        // Before anything connects: a jobs Redis that cannot be is said plainly.
        if !service.durable_jobs().is_empty() {
            JobSettings::from_config(&config).map_err(ServeError::Config)?;
        }
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let tls = match config.tls_files() {
            Some(files) => Some(Arc::new(
                tls::TlsAcceptor::new(files).map_err(ServeError::Tls)?,
            )),
            None => None,
        };
        let backend = choose_backend(config.io_backend)?;
        let n = config.worker_count();
        let metrics = Metrics::new(n, backend.name());
        let (listeners, addr) = listener::bind_all(config.bind, n, config.defer_accept_secs)
            .map_err(|e| ServeError::bind(config.bind, e))?;
        let plain_bind = config
            .plain_bind_addr()
            .map_err(|e| ServeError::Config(e.0))?;
        let (plain_listeners, plain_addr) = match plain_bind {
            Some(plain) => {
                let (listeners, bound) = listener::bind_all(plain, n, config.defer_accept_secs)
                    .map_err(|e| ServeError::bind(plain, e))?;
                (listeners.into_iter().map(Some).collect(), Some(bound))
            }
            None => ((0..n).map(|_| None).collect::<Vec<_>>(), None),
        };
        // One metrics listener is enough for scrapes and health checks: worker 0's.
        let metrics_bind = config
            .metrics_bind_addr()
            .map_err(|e| ServeError::Config(e.0))?;
        let (mut metrics_listener, metrics_addr) = match metrics_bind {
            Some(at) => {
                let (mut listeners, bound) = listener::bind_all(at, 1, config.defer_accept_secs)
                    .map_err(|e| ServeError::bind(at, e))?;
                (listeners.pop(), Some(bound))
            }
            None => (None, None),
        };
        service
            .configure(&config, &metrics)
            .map_err(ServeError::Config)?;
        service.bind_workers(n).map_err(ServeError::Config)?;
        let config = Arc::new(config);
        let executor = Executor::start_with_nice(
            config.task_threads,
            config.task_queue_capacity,
            Some(config.task_nice),
        )
        .map_err(|e| ServeError::Worker(format!("cannot start the background executor: {e}")))?;
        let jobs = start_jobs(&config, &*service, &executor)?;
        let cx = Context {
            config: config.clone(),
            metrics: metrics.clone(),
            tasks: executor.handle(),
        };
        let signal = Arc::new(ShutdownSignal::default());
        let open_global = Arc::new(AtomicUsize::new(0));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut threads = Vec::with_capacity(n);
        let ip_limits = Arc::new(ip_limits::IpLimits::new(&config));
        for (index, (listener, plain_listener)) in
            listeners.into_iter().zip(plain_listeners).enumerate()
        {
            let spec = worker::WorkerSpec {
                index,
                core: (!cores.is_empty()).then(|| cores[index % cores.len()]),
                listener,
                plain_listener,
                metrics_listener: metrics_listener.take(),
                tls: tls.clone(),
                config: config.clone(),
                service: service.clone(),
                cx: cx.clone(),
                metrics: metrics.worker(index),
                open_global: open_global.clone(),
                signal: signal.clone(),
                backend,
                ring_entries: worker::RING_ENTRIES,
                ip_limits: ip_limits.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("ringsocket-w{index}"))
                .spawn(move || worker::run(spec))
                .map_err(|e| ServeError::Worker(e.to_string()))?;
            threads.push(thread);
        }
        tracing::info!(%addr, tls = tls.is_some(), workers = n, io_backend = backend.name(), task_threads = config.task_threads, "listening");
        if let Some(plain) = plain_addr {
            tracing::info!(%plain, "listening without TLS too (plain_bind)");
        }
        if let Some(metrics) = metrics_addr {
            tracing::info!(%metrics, "serving /metrics and /healthz on the metrics listener (metrics_bind)");
        }
        Ok(RunningServer {
            addr,
            plain_addr,
            metrics_addr,
            tls,
            backend,
            signal,
            threads,
            metrics,
            tasks: executor.handle(),
            executor: Some(executor),
            jobs,
            shutdown_timeout: config.shutdown_timeout(),
        })
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    plain_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    tls: Option<Arc<tls::TlsAcceptor>>,
    backend: Backend,
    signal: Arc<ShutdownSignal>,
    threads: Vec<JoinHandle<Result<(), String>>>,
    metrics: Metrics,
    executor: Option<Executor>,
    tasks: TaskHandle,
    /// The durable job queue, when the service registers jobs.
    jobs: Option<DurableJobs>,
    shutdown_timeout: Duration,
}

impl RunningServer {
    /// The address the server listens on (with the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the plain listener beside the TLS one (`plain_bind`), if any.
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    /// The address of the metrics listener (`metrics_bind`), if any: plain HTTP,
    /// `GET /metrics` and `GET /healthz` only.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The TLS configuration of the listeners on [`RunningServer::local_addr`], when
    /// they speak TLS; [`tls::TlsAcceptor::reload`] reads the certificate again.
    pub fn tls(&self) -> Option<Arc<tls::TlsAcceptor>> {
        self.tls.clone()
    }

    /// Reads the TLS certificate and key again (what SIGHUP does in `serve`): new
    /// handshakes use the new certificate, open connections keep theirs, and a file
    /// that does not load keeps the old one (the error says why). An error too when
    /// the server has no TLS.
    pub fn reload_tls(&self) -> Result<(), String> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Err("no TLS configured (tls_cert, tls_key)".into()),
        }
    }

    /// The I/O backend the workers run on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every worker's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Queues background jobs on the server's executor.
    pub fn tasks(&self) -> TaskHandle {
        self.tasks.clone()
    }

    /// The signal that stops the server; give it to a signal handler.
    pub fn shutdown_signal(&self) -> Arc<ShutdownSignal> {
        self.signal.clone()
    }

    /// Starts a graceful shutdown: stop accepting, Close 1001 to every connection.
    pub fn shutdown(&self) {
        self.signal.trigger();
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully and waits for the end
    /// (for examples and small programs; `ringsocket serve` does the same).
    pub fn run_until_signalled(self) -> Result<(), ServeError> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])
        .map_err(|e| ServeError::Worker(format!("cannot install signal handlers: {e}")))?;
        let signal = signals.forever().next();
        // The shutdown first: it must never depend on a log line being written.
        self.shutdown();
        if let Some(signal) = signal {
            tracing::info!(signal, "shutting down: closing connections with 1001");
        }
        self.join()
    }

    /// Waits for every worker to finish (after a shutdown), then drains the background
    /// queue within `shutdown_timeout` (no connection is left to schedule jobs).
    pub fn join(mut self) -> Result<(), ServeError> {
        self.join_threads()
    }

    fn join_threads(&mut self) -> Result<(), ServeError> {
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            let outcome = match thread.join() {
                Ok(outcome) => outcome,
                Err(_) => Err("a worker thread panicked".into()),
            };
            if let Err(e) = outcome {
                // The others stop too; the first failure is the one reported.
                self.signal.trigger();
                if result.is_ok() {
                    result = Err(ServeError::Worker(e));
                }
            }
        }
        // Durable jobs: no new one is read; the running ones drain with the executor;
        // what is left stays in Redis, released for another process.
        if let Some(jobs) = self.jobs.as_mut() {
            jobs.stop_reading();
        }
        if let Some(executor) = self.executor.take() {
            executor.shutdown(self.shutdown_timeout);
        }
        if let Some(jobs) = self.jobs.take() {
            jobs.shutdown();
        }
        result
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.signal.trigger();
        let _ = self.join_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` explains why io_uring is unavailable and what to change.
    #[test]
    fn io_uring_errors_name_the_cause_and_the_fix() {
        let text = explain_io_uring_error(&io::Error::from_raw_os_error(libc::EPERM));
        assert!(
            text.contains("kernel.io_uring_disabled") && text.contains("seccomp"),
            "{text}"
        );
        let text = explain_io_uring_error(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(text.contains("5.11"), "{text}");
        let text = explain_io_uring_error(&io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(text.contains("RLIMIT_MEMLOCK"), "{text}");
    }

    #[test]
    fn io_uring_is_available_here() {
        // The tests of the server need it; say so plainly when it is missing.
        if let Err(e) = probe_io_uring() {
            panic!("{e}");
        }
    }

    /// An idle WebSocket costs mostly two allocations: its driver's task (tokio's task
    /// cell: the driver plus 104 bytes, rounded up to a multiple of 128) and its session
    /// (`Rc`: 16 bytes plus the session, in mimalloc's 448-byte size class). One field
    /// more and each jumps to the next class: 128 and 192 bytes more per connection
    /// (issue 3's idle-memory target). Box state an idle connection does not need.
    #[test]
    fn idle_connection_state_stays_within_its_size_classes() {
        let driver = std::mem::size_of::<ws::Driver>();
        assert!(driver + 104 <= 384, "Driver is {driver} bytes");
        let session = std::mem::size_of::<session::SessionInner>();
        assert!(session + 16 <= 448, "SessionInner is {session} bytes");
    }
}
