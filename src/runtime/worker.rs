//! A worker: an OS thread pinned to a core, running its own tokio current-thread
//! runtime and, on the io_uring backend, its own ring (`uring`; on the epoll backend
//! tokio's reactor moves the bytes), its own listener and accept loop, and every
//! connection it accepted, for their whole life.

use std::cell::{Cell, RefCell};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};

use super::buf::BufPool;
use super::client_addr::{Cidrs, canonical};
use super::compression::CompressionPolicy;
use super::conn::drive;
use super::core::limits::LimitPolicy;
use super::core::timers::TimerPolicy;
use super::core::transport::Listener;
use super::ctx::{Door, WorkerCtx};
use super::inbound::InboundBudget;
use super::ip_limits::IpLimits;
use super::registry::{self, Registry};
use super::service::{Context, Service};
use super::shutdown::ShutdownSignal;
use super::tls::TlsAcceptor;
use super::uring::{self, Ring};
use super::{Backend, epoll};
use crate::config::Config;
use crate::metrics::WorkerMetrics;
use crate::proto::{HandshakeLimits, Limits};

/// What a worker thread starts with.
pub(crate) struct WorkerSpec {
    pub(crate) index: usize,
    pub(crate) core: Option<core_affinity::CoreId>,
    pub(crate) listener: std::net::TcpListener,
    /// The plain listener beside a TLS one (`plain_bind`).
    pub(crate) plain_listener: Option<std::net::TcpListener>,
    /// The metrics listener (`metrics_bind`), on one worker only.
    pub(crate) metrics_listener: Option<std::net::TcpListener>,
    /// The TLS configuration of `listener`, when it speaks TLS.
    pub(crate) tls: Option<Arc<TlsAcceptor>>,
    pub(crate) config: Arc<Config>,
    pub(crate) service: Arc<dyn Service>,
    pub(crate) cx: Context,
    pub(crate) metrics: Arc<WorkerMetrics>,
    pub(crate) open_global: Arc<AtomicUsize>,
    pub(crate) signal: Arc<ShutdownSignal>,
    /// The I/O backend to run on.
    pub(crate) backend: super::Backend,
    /// Submission queue entries of the worker's ring (io_uring backend).
    pub(crate) ring_entries: u32,
    /// The per-IP limits, shared by every worker.
    pub(crate) ip_limits: Arc<IpLimits>,
}

/// The submission queue size of each worker's ring.
pub(crate) const RING_ENTRIES: u32 = 256;

/// Runs a worker to the end of its shutdown. A per-worker resource that cannot be
/// set up (its io_uring, its runtime) is an error that names the worker and the
/// cause; the other workers are then shut down too, so that the process exits with
/// that error instead of running on with a core missing.
pub(crate) fn run(spec: WorkerSpec) -> Result<(), String> {
    let index = spec.index;
    let signal = spec.signal.clone();
    let result = run_worker(spec);
    if let Err(e) = &result {
        tracing::error!(worker = index, "{e}");
        signal.trigger();
    }
    result
}

fn run_worker(spec: WorkerSpec) -> Result<(), String> {
    if let Some(core) = spec.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(
                worker = spec.index,
                core = core.id,
                "could not pin worker to its core"
            );
        }
    }
    let config = spec.config.clone();
    let limits = Limits::default()
        .with_max_message_size(config.max_message_size)
        .with_max_frame_size(config.max_frame_size.min(config.max_message_size));
    let head_limits = HandshakeLimits {
        max_head_bytes: config.max_head_bytes,
        ..HandshakeLimits::default()
    };
    let ring = match spec.backend {
        Backend::IoUring => Some(Ring::new(spec.ring_entries).map_err(|e| {
            format!(
                "worker {} cannot set up its io_uring ({} entries): {}",
                spec.index,
                spec.ring_entries,
                super::explain_io_uring_error(&e)
            )
        })?),
        Backend::Epoll => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("worker {} cannot start its runtime: {e}", spec.index))?;
    let local = tokio::task::LocalSet::new();
    let served = local.block_on(&runtime, async move {
        if let Some(ring) = ring {
            ring.start()
                .map_err(|e| format!("worker {} cannot poll its io_uring: {e}", spec.index))?;
        }
        let open = |listener: std::net::TcpListener| match spec.backend {
            Backend::IoUring => Ok(Listener::Uring(uring::net::TcpListener::from_std(listener))),
            Backend::Epoll => epoll::TcpListener::from_std(listener)
                .map(Listener::Epoll)
                .map_err(|e| {
                    format!(
                        "worker {} cannot register its listener with epoll: {e}",
                        spec.index
                    )
                }),
        };
        // The main listener (TLS when configured), then the plain one beside it.
        // `proxy_protocol` is for the main one (behind the load balancer) only.
        let front = Front {
            tls: spec.tls.clone(),
            proxy_protocol: config.proxy_protocol,
            door: Door::Main,
        };
        let mut listeners = vec![(Rc::new(open(spec.listener)?), front)];
        if let Some(plain) = spec.plain_listener {
            listeners.push((Rc::new(open(plain)?), Front::default()));
        }
        // The metrics listener, never TLS.
        let metrics_elsewhere = !config.metrics_bind.trim().is_empty();
        if let Some(metrics) = spec.metrics_listener {
            let front = Front {
                door: Door::Metrics,
                ..Front::default()
            };
            listeners.push((Rc::new(open(metrics)?), front));
        }
        let compression = CompressionPolicy::from_config(&config, &spec.cx.metrics);
        let inbound = InboundBudget::new(
            config.max_inbound_memory,
            spec.cx.metrics.inbound_buffered().clone(),
        );
        let ctx = Rc::new(WorkerCtx {
            config: config.clone(),
            service: spec.service,
            cx: spec.cx,
            metrics: spec.metrics,
            metrics_elsewhere,
            open_global: spec.open_global,
            open_local: Cell::new(0),
            shutting_down: Cell::new(false),
            shutdown: Notify::new(),
            sessions: RefCell::new(Registry::default()),
            drained: Notify::new(),
            pool: BufPool::default(),
            limits,
            head_limits,
            timers: TimerPolicy::from_config(&config),
            trusted_proxies: Cidrs::parse(&config.trusted_proxies),
            ip_limits: spec.ip_limits,
            conn_limits: LimitPolicy::from_config(&config, Instant::now().into_std()),
            inbound,
            compression,
        });
        // The service's task for this core (e.g. its pubsub inbox), for the worker's life.
        let core_task = ctx
            .service
            .worker_started(spec.index, &ctx.cx)
            .map(tokio::task::spawn_local);
        // Writes the frames broadcast to this core's connections.
        tokio::task::spawn_local(super::flush::run(ctx.metrics.clone()));
        // One timer for the whole core: wakes the sessions whose deadline has passed.
        let tick = registry::tick(&ctx.timers);
        let housekeeping = ctx.clone();
        tokio::task::spawn_local(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                housekeeping.sessions.borrow().wake_due(Instant::now());
            }
        });
        tracing::debug!(worker = spec.index, "worker accepting");
        for (listener, front) in &listeners {
            for _ in 0..ACCEPTS_IN_FLIGHT {
                tokio::task::spawn_local(accept_loop(
                    listener.clone(),
                    front.clone(),
                    ctx.clone(),
                    spec.signal.clone(),
                    spec.index,
                ));
            }
        }
        spec.signal.wait().await;
        // Stop accepting: wake the accepts still in flight; the sockets close once the
        // accept loops, which see the signal too, have let go of them.
        for (listener, _) in listeners {
            // SAFETY: the descriptor belongs to `listener`, which is alive here;
            // shutdown(2) on it has no memory effects.
            unsafe {
                libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        ctx.shutting_down.set(true);
        ctx.shutdown.notify_waiters();
        ctx.sessions.borrow().shut_down_all();
        let deadline = Instant::now() + config.shutdown_timeout() + Duration::from_secs(1);
        while ctx.open_local.get() > 0 {
            let drained = ctx.drained.notified();
            if ctx.open_local.get() == 0 {
                break;
            }
            if timeout_at(deadline, drained).await.is_err() {
                tracing::warn!(
                    worker = spec.index,
                    left = ctx.open_local.get(),
                    sessions = ctx.sessions.borrow().len(),
                    "connections still open after the shutdown timeout"
                );
                break;
            }
        }
        if let Some(task) = core_task {
            task.abort();
        }
        tracing::debug!(worker = spec.index, "worker stopped");
        Ok(())
    });
    // The tasks left (connections past the shutdown timeout) go first, then the ring,
    // once the kernel is done with their buffers.
    let _context = runtime.enter();
    drop(local);
    uring::teardown();
    served
}

/// What a listener's connections start with before HTTP: a PROXY protocol header, a
/// TLS session.
#[derive(Clone, Default)]
pub(crate) struct Front {
    pub(crate) tls: Option<Arc<TlsAcceptor>>,
    pub(crate) proxy_protocol: bool,
    /// Which listener: the main ones route everything, the metrics one only probes.
    pub(crate) door: Door,
}

/// Accepts in flight on each worker's listener. When connections come in faster than
/// the core goes round, several accepts complete in one batch of completions and are
/// submitted again together, instead of one connection per turn of the core. Measured
/// on a flood of handshakes (with deferred accepts): 4 cut the CPU per handshake by
/// about 10 % against 1; 8 and 16 gained nothing more.
const ACCEPTS_IN_FLIGHT: usize = 4;

/// Accepts connections until the shutdown signal, each served by a task of its own.
async fn accept_loop(
    listener: Rc<Listener>,
    front: Front,
    ctx: Rc<WorkerCtx>,
    signal: Arc<ShutdownSignal>,
    worker: usize,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let open = ctx.open_global.fetch_add(1, Ordering::Relaxed);
                    let over_limit = open >= ctx.config.max_connections;
                    // The PROXY header (if any) and the TLS session start in the
                    // connection's task.
                    tokio::task::spawn_local(drive(stream, canonical(peer), front.clone(), ctx.clone(), over_limit));
                }
                Err(e) => {
                    if signal.is_set() {
                        break;
                    }
                    // Out of descriptors or memory: back off instead of spinning.
                    tracing::warn!(worker, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = signal.wait() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::proto::handshake::Request;
    use crate::runtime::{Response, Route};
    use crate::tasks::Executor;

    struct NotFound;

    impl Service for NotFound {
        fn route(&self, _: &Request, _: std::net::SocketAddr, _: &Context) -> Route {
            Route::Respond(Response::error(404, "none"))
        }
    }

    /// A worker whose ring cannot be set up (here: more submission entries than the
    /// kernel allows) returns one error naming the worker and the cause, and stops
    /// the other workers, instead of panicking on an `unwrap()` in its thread.
    #[test]
    fn a_worker_whose_ring_fails_reports_it_and_stops_the_others() {
        let config = Arc::new(Config::default());
        let executor = Executor::start(1, 16).unwrap();
        let metrics = Metrics::new(1, Backend::IoUring.name());
        let signal = Arc::new(ShutdownSignal::default());
        let spec = WorkerSpec {
            index: 3,
            core: None,
            listener: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            plain_listener: None,
            metrics_listener: None,
            tls: None,
            config: config.clone(),
            service: Arc::new(NotFound),
            cx: Context {
                config,
                metrics: metrics.clone(),
                tasks: executor.handle(),
            },
            metrics: metrics.worker(0),
            open_global: Arc::default(),
            signal: signal.clone(),
            backend: Backend::IoUring,
            // IORING_MAX_ENTRIES is 32,768: io_uring_setup refuses this with EINVAL.
            ring_entries: 1 << 20,
            ip_limits: Arc::new(IpLimits::new(&Config::default())),
        };
        let err = std::thread::spawn(move || run(spec))
            .join()
            .expect("the worker thread does not panic")
            .unwrap_err();
        assert!(
            err.starts_with("worker 3 cannot set up its io_uring (1048576 entries): "),
            "{err}"
        );
        assert!(signal.is_set(), "the other workers are told to stop");
        executor.shutdown(std::time::Duration::from_secs(1));
    }
}
